//! `train rl`: reinforcement learning on GSM8K, as nanochat's `scripts/chat_rl.py` (92d63d4).
//!
//! On-policy and simple (nanochat calls it "GRPO" in quotes: REINFORCE with a group baseline):
//! every step takes `--examples-per-step` training questions; for each, `--num-samples`
//! completions are sampled from the current model (temperature, top-k, the calculator active);
//! the reward is 1 when the answer after `####` is right; a sample's advantage is its reward
//! minus the mean over the question's samples; the loss is the token-level normalised policy
//! gradient `-sum(logp * advantage) / (learned tokens x passes x examples)` over the tokens the
//! policy sampled (the prompt and the calculator's forced output carry none). A fresh
//! MuonAdamW (nanochat's RL LRs, all x `--init-lr-frac` 0.05) with the LR ramping linearly to 0
//! over one epoch of GSM8K train; pass@k on held-out GSM8K test problems every
//! `--eval-every` steps and at the end; checkpoints in the run layout every stage shares
//! (`serve --checkpoint OUT` chats with the result), and `--resume` continues bit-identically.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Device, Grads, Ids, MuonAdamW, Reduction, Tensor, no_grad};
use femtochat_model::Gpt;
use femtochat_model::checkpoint::load_model;
use femtochat_model::generate::generate_batch;
use femtochat_model::sampler::SamplingParams;
use femtochat_model::tokenizer::Tokenizer;

use crate::base::learning_rate;
use crate::eval::chat::prompt_ids;
use crate::rundir::{self, ResumeInputs, RunRecord};
use crate::tasks::{Gsm8k, Task};
use crate::trainer::{self, Batch, BatchSource, LrSchedule, Settings, Trainer};

pub mod rollout;
#[cfg(test)]
mod tests;

use rollout::{Group, PgRows, advantages, pass_at_k, pg_weights, sampled_mask};

#[derive(clap::Args)]
pub struct Args {
    /// The chat model to improve (an `sft` run, or any run directory): its latest checkpoint and
    /// tokenizer. Not needed with --resume.
    #[arg(long, required_unless_present = "resume")]
    sft: Option<PathBuf>,
    /// Run directory (the layout of every stage; `serve --checkpoint OUT` loads it).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: rundir::RunFlags,
    /// GSM8K training problems, {question, answer} JSONL(.gz) (default:
    /// data/sft/gsm8k_train.jsonl.gz, the 7,473 of GSM8K train in nanochat's order).
    #[arg(long)]
    train_data: Option<PathBuf>,
    /// Held-out GSM8K problems for pass@k (default: data/eval/chat/gsm8k/test.jsonl.gz).
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Epochs over the training problems (nanochat: 1).
    #[arg(long, default_value_t = 1)]
    num_epochs: usize,
    /// Optimizer steps (default: epochs x problems / examples per step).
    #[arg(long)]
    num_iterations: Option<usize>,
    /// Sequences per forward pass, in sampling and in the loss (nanochat: 8).
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Questions per optimizer step (nanochat: 16).
    #[arg(long, default_value_t = 16)]
    examples_per_step: usize,
    /// Completions sampled per question, a multiple of --device-batch-size (nanochat: 16).
    #[arg(long, default_value_t = 16)]
    num_samples: usize,
    /// Tokens a completion may have (nanochat: 256).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature of the rollouts and of pass@k (nanochat: 1.0).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Sample from the k most likely tokens (0: all; nanochat: 50).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// AdamW LR of the token embedding (nanochat's RL: 0.2).
    #[arg(long, default_value_t = 0.2, value_parser = learning_rate)]
    embedding_lr: f32,
    /// AdamW LR of the lm_head (0.004).
    #[arg(long, default_value_t = 0.004, value_parser = learning_rate)]
    unembedding_lr: f32,
    /// Muon LR of the block matrices (0.02).
    #[arg(long, default_value_t = 0.02, value_parser = learning_rate)]
    matrix_lr: f32,
    /// Muon weight decay (0).
    #[arg(long, default_value_t = 0.0, value_parser = learning_rate)]
    weight_decay: f32,
    /// Every LR times this (nanochat: 0.05); the schedule then ramps it linearly to 0.
    #[arg(long, default_value_t = 0.05, value_parser = crate::base::fraction)]
    init_lr_frac: f64,
    /// pass@k on the held-out problems every N steps, from step 0, and at the end (0: only at
    /// the end; nanochat: 60).
    #[arg(long, default_value_t = 60)]
    eval_every: usize,
    /// Held-out problems per pass@k evaluation (nanochat: 400); k runs to --device-batch-size.
    #[arg(long, default_value_t = 400)]
    eval_examples: usize,
    /// Checkpoint every N steps (0: only at the end; nanochat: 60).
    #[arg(long, default_value_t = 60)]
    save_every: usize,
    /// Seed of the rollouts' and the evaluation's sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu or gpu.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// What a run's rollouts and evaluation need (the run's fixed flags, resolved).
#[derive(Clone, Debug)]
pub struct Options {
    pub examples_per_step: usize,
    pub num_samples: usize,
    pub device_batch_size: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub eval_examples: usize,
    pub seed: u64,
}

impl Options {
    fn from_flags(f: &BTreeMap<String, String>) -> Result<Options> {
        let top_k: usize = num(f, "top_k")?;
        let o = Options {
            examples_per_step: num(f, "examples_per_step")?,
            num_samples: num(f, "num_samples")?,
            device_batch_size: num(f, "device_batch_size")?,
            max_new_tokens: num(f, "max_new_tokens")?,
            sampling: SamplingParams {
                temperature: num(f, "temperature")?,
                top_k: (top_k > 0).then_some(top_k),
                ..Default::default()
            },
            eval_examples: num(f, "eval_examples")?,
            seed: num(f, "seed")?,
        };
        o.sampling.validate()?;
        if o.device_batch_size == 0 || o.examples_per_step == 0 || o.max_new_tokens == 0 {
            bail!("--device-batch-size, --examples-per-step and --max-new-tokens must be positive");
        }
        if o.num_samples == 0 || !o.num_samples.is_multiple_of(o.device_batch_size) {
            bail!(
                "--num-samples {} must be a positive multiple of --device-batch-size {} (the \
                 samples are drawn and learned a device batch at a time)",
                o.num_samples,
                o.device_batch_size
            );
        }
        Ok(o)
    }
}

fn num<T: std::str::FromStr>(f: &BTreeMap<String, String>, k: &str) -> Result<T> {
    f.get(k).and_then(|v| v.parse().ok()).with_context(|| format!("flag {k} is missing or invalid"))
}

/// A sampling seed for (step, question, device batch), as nanochat hashes
/// `(step, example_idx, sampling_step)`; kept below 2^31 so that `seed + row` cannot overflow.
fn rollout_seed(seed: u64, step: usize, example: usize, pass: usize) -> u64 {
    let mut x = seed;
    for v in [step as u64, example as u64, pass as u64] {
        // splitmix64 rounds.
        x = x.wrapping_add(v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
    }
    x & 0x7FFF_FFFF
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    /// The step's policy-gradient loss (the sum over its passes; its gradient is the update's).
    pub loss: f64,
    /// Mean reward over the step's samples.
    pub reward: f64,
    /// Mean length of the sampled sequences (prompt included, as nanochat logs it).
    pub sequence_length: f64,
    /// Tokens the policy generated this step.
    pub generated: usize,
}

/// The policy-gradient loss of one question's rollouts (nanochat's, summed over its device
/// batches) and its gradient; None when every weight is 0 (equal rewards, nothing sampled),
/// where the gradient is exactly zero, which the optimizer takes the same as an absent one.
pub fn group_loss(
    gpt: &Gpt,
    group: &Group,
    pad: u32,
    device_batch_size: usize,
    examples_per_step: usize,
) -> Result<(f64, Option<Grads>)> {
    let adv = advantages(&group.rewards);
    let rows = PgRows::new(group, pad)?;
    if device_batch_size == 0 || !rows.rows.is_multiple_of(device_batch_size) {
        bail!("{} samples do not split into device batches of {device_batch_size}", rows.rows);
    }
    let passes = rows.rows / device_batch_size;
    let (mut total, mut grads): (f64, Option<Grads>) = (0.0, None);
    for p in 0..passes {
        let (r0, r1) = (p * device_batch_size, (p + 1) * device_batch_size);
        let (inputs, targets) = rows.slice(r0, r1);
        let w = pg_weights(&targets, rows.t, &adv[r0..r1], passes, examples_per_step);
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        let idx = Ids::new(inputs, &[device_batch_size, rows.t])?;
        let nll = gpt.loss(&idx, &targets, Reduction::None)?; // (B*T)
        let w = Tensor::from_vec(w, &[targets.len()])?.to_device(nll.device())?;
        let loss = nll.mul(&w)?.sum()?;
        total += loss.item()? as f64;
        let g = loss.backward()?;
        match grads.as_mut() {
            None => grads = Some(g),
            Some(acc) => acc.accumulate(g)?,
        }
    }
    Ok((total, grads))
}

/// RL on a task whose `evaluate` is the reward: the rollouts, the loss and the evaluation.
pub struct Rl {
    pub tok: Arc<Tokenizer>,
    pub train: Arc<dyn Task>,
    pub val: Option<Arc<dyn Task>>,
    pub opts: Options,
    /// Training questions consumed so far (they cycle: question `examples % len` is next).
    pub examples: usize,
}

impl Rl {
    /// `num_samples` completions of training question `idx`, with their masks and rewards.
    pub fn rollout(&self, gpt: &Gpt, step: usize, idx: usize) -> Result<Group> {
        let _g = no_grad();
        let o = &self.opts;
        let conv = self.train.conversation(idx)?;
        let prompt = prompt_ids(&self.tok, &conv)?;
        let mut group = Group { seqs: Vec::new(), masks: Vec::new(), rewards: Vec::new() };
        for pass in 0..o.num_samples / o.device_batch_size {
            let prompts = vec![prompt.clone(); o.device_batch_size];
            let seed = rollout_seed(o.seed, step, idx, pass);
            let outs = generate_batch(
                gpt,
                &self.tok,
                &prompts,
                &o.sampling,
                o.max_new_tokens,
                o.device_batch_size,
                seed,
            )?;
            for generated in outs {
                let text = self.tok.decode(&generated)?;
                group.rewards.push(f32::from(u8::from(self.train.evaluate(idx, &text)?)));
                let mut mask = vec![0u8; prompt.len()];
                mask.extend(sampled_mask(&self.tok, &generated)?);
                let mut seq = prompt.clone();
                seq.extend(generated);
                group.masks.push(mask);
                group.seqs.push(seq);
            }
        }
        Ok(group)
    }

    /// One optimizer step: rollouts of the next `examples_per_step` questions, the
    /// policy-gradient loss and its gradient, the update.
    pub fn step(&mut self, tr: &mut Trainer) -> Result<StepLog> {
        let o = self.opts.clone();
        let step = tr.step();
        let pad = self.tok.special("<|assistant_end|>")?;
        let mut grads: Option<Grads> = None;
        let mut log = StepLog { loss: 0.0, reward: 0.0, sequence_length: 0.0, generated: 0 };
        for _ in 0..o.examples_per_step {
            let idx = self.examples % self.train.len();
            self.examples += 1;
            let group = self.rollout(&tr.gpt, step, idx)?;
            log.reward += group.rewards.iter().map(|&r| r as f64).sum::<f64>();
            log.sequence_length += group.seqs.iter().map(|s| s.len() as f64).sum::<f64>();
            log.generated += group.masks.iter().flatten().filter(|&&m| m == 1).count();
            let (loss, g) =
                group_loss(&tr.gpt, &group, pad, o.device_batch_size, o.examples_per_step)?;
            if !loss.is_finite() {
                bail!("non-finite policy-gradient loss ({loss}) at step {step}");
            }
            log.loss += loss;
            match (grads.as_mut(), g) {
                (_, None) => {}
                (None, Some(g)) => grads = Some(g),
                (Some(acc), Some(g)) => acc.accumulate(g)?,
            }
        }
        tr.apply_grads(&grads.unwrap_or_default())?;
        let n = (o.examples_per_step * o.num_samples) as f64;
        log.reward /= n;
        log.sequence_length /= n;
        Ok(log)
    }

    /// pass@k (k = 1..=device batch) on the first `eval_examples` held-out problems, each
    /// sampled `device_batch_size` times with the rollouts' temperature and top-k.
    pub fn pass_at_k(&self, gpt: &Gpt) -> Result<Vec<f64>> {
        let Some(val) = &self.val else { return Ok(Vec::new()) };
        let _g = no_grad();
        let o = &self.opts;
        let n = o.eval_examples.min(val.len());
        let mut outcomes = Vec::with_capacity(n);
        for i in 0..n {
            let prompt = prompt_ids(&self.tok, &val.conversation(i)?)?;
            let prompts = vec![prompt; o.device_batch_size];
            let seed = rollout_seed(o.seed ^ 0x5EED, 0, i, 0);
            let outs = generate_batch(
                gpt,
                &self.tok,
                &prompts,
                &o.sampling,
                o.max_new_tokens,
                o.device_batch_size,
                seed,
            )?;
            let row = outs
                .iter()
                .map(|g| val.evaluate(i, &self.tok.decode(g)?))
                .collect::<Result<Vec<bool>>>()?;
            outcomes.push(row);
        }
        Ok(pass_at_k(&outcomes))
    }

    /// Evaluate and log pass@k at `step` (nothing without held-out problems).
    fn log_eval(&self, tr: &Trainer, step: usize) -> Result<Option<f64>> {
        let passk = self.pass_at_k(&tr.gpt)?;
        if passk.is_empty() {
            return Ok(None);
        }
        let mut line = serde_json::json!({ "step": step });
        for (k, v) in passk.iter().enumerate() {
            line[format!("pass@{}", k + 1)] = serde_json::json!(v);
        }
        tr.log(line)?;
        let shown: Vec<String> =
            passk.iter().enumerate().map(|(k, v)| format!("pass@{}: {v:.4}", k + 1)).collect();
        eprintln!("step {step} | {}", shown.join(", "));
        Ok(passk.first().copied())
    }

    /// Train to the trainer's `num_iterations`: pass@k every `eval_every` steps (from step 0)
    /// and at the end, a checkpoint every `save_every` steps and at the end.
    pub fn run(
        &mut self,
        tr: &mut Trainer,
        mut progress: impl FnMut(usize, &StepLog),
    ) -> Result<Summary> {
        let s = tr.settings.clone();
        let start = Instant::now();
        let first = tr.step();
        let mut last = None;
        let mut generated = 0usize;
        while tr.step() < s.num_iterations {
            let it = tr.step();
            if s.eval_every > 0 && it.is_multiple_of(s.eval_every) {
                self.log_eval(tr, it)?;
            }
            let t0 = Instant::now();
            let log = self.step(tr)?;
            let dt = t0.elapsed().as_secs_f64();
            let lrm = s.schedule_at(it).0;
            tr.log(serde_json::json!({
                "step": it, "loss": log.loss, "reward": log.reward,
                "sequence_length": log.sequence_length, "lr_mult": lrm,
                "generated_tokens": log.generated, "dt_ms": dt * 1e3,
                "gen_tok_per_s": log.generated as f64 / dt.max(1e-9),
            }))?;
            generated += log.generated;
            progress(it, &log);
            last = Some(log);
            if s.save_every > 0
                && tr.step().is_multiple_of(s.save_every)
                && tr.step() < s.num_iterations
            {
                tr.save(self.state())?;
            }
        }
        let pass1 = self.log_eval(tr, tr.step())?;
        tr.save(self.state())?;
        let seconds = start.elapsed().as_secs_f64();
        Ok(Summary {
            steps: tr.step(),
            trained: tr.step() - first,
            final_reward: last.as_ref().map(|l| l.reward),
            pass_at_1: pass1,
            generated_tokens: generated,
            seconds,
        })
    }

    /// What a checkpoint records of the rollouts' progress.
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "examples": self.examples })
    }
}

/// What `train rl` prints when it finishes (one JSON line on stdout).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    /// Steps trained by this call.
    pub trained: usize,
    pub final_reward: Option<f64>,
    pub pass_at_1: Option<f64>,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Where a resumed run's rollouts stand, read back through the trainer's checkpoint (RL draws
/// no batches from a loader: `next_batch` is never called by `Trainer::resume`).
struct Cursor(usize);

impl BatchSource for Cursor {
    fn next_batch(&mut self) -> Result<Batch> {
        bail!("RL draws its batches from rollouts of the model, not from a loader")
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "examples": self.0 })
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.0 =
            state["examples"].as_u64().context("the checkpoint has no RL `examples`")? as usize;
        Ok(())
    }
}

fn default_path(given: &Option<PathBuf>, bundled: &str, file: &str) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(crate::tasks::bundled(bundled)?.join(file)),
    }
}

/// The run's fixed flags as this command line gives them (all of them for a new run; only the
/// explicit ones for the resume check).
fn flags(a: &Args, train: &Path, val: &Path) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_string(), v);
    };
    put("sft", a.sft.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
    put("train_data", train.display().to_string());
    put("val_data", val.display().to_string());
    put("num_epochs", a.num_epochs.to_string());
    put("device_batch_size", a.device_batch_size.to_string());
    put("examples_per_step", a.examples_per_step.to_string());
    put("num_samples", a.num_samples.to_string());
    put("max_new_tokens", a.max_new_tokens.to_string());
    put("temperature", a.temperature.to_string());
    put("top_k", a.top_k.to_string());
    put("embedding_lr", a.embedding_lr.to_string());
    put("unembedding_lr", a.unembedding_lr.to_string());
    put("matrix_lr", a.matrix_lr.to_string());
    put("weight_decay", a.weight_decay.to_string());
    put("init_lr_frac", a.init_lr_frac.to_string());
    put("eval_examples", a.eval_examples.to_string());
    put("seed", a.seed.to_string());
    f
}

pub fn main(a: Args, explicit: &BTreeSet<String>) -> Result<()> {
    a.device.ensure_available().with_context(|| format!("--device {}", a.device))?;
    if crate::dist::world().size() > 1 {
        bail!("train rl runs on one process (its rollouts are not split over MPI ranks yet)");
    }
    let train_path = default_path(&a.train_data, "data/sft", "gsm8k_train.jsonl.gz")?;
    let val_path = default_path(&a.val_data, "data/eval/chat", "gsm8k/test.jsonl.gz")?;
    let given = flags(&a, &train_path, &val_path);
    let (mut trainer, tok, f, examples, _lock) = if a.run.resume {
        let (lock, record) = rundir::begin_resume(&a.out)?;
        let f = match &record {
            Some(r) if r.stage != "rl" => bail!(
                "--resume: {} holds a `{}` run, not an RL run; give `train rl` a new --out",
                a.out.display(),
                r.stage
            ),
            Some(r) => {
                let mine: BTreeMap<String, String> = given
                    .iter()
                    .filter(|(k, _)| explicit.contains(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let now = ResumeInputs {
                    explicit,
                    flags: &mine,
                    data: std::slice::from_ref(&train_path),
                    val: std::slice::from_ref(&val_path),
                    tokenizer: None,
                    force: a.run.force,
                };
                rundir::check_resume(&a.out, r, &now)?;
                r.flags.clone()
            }
            None => given.clone(),
        };
        let tok = Arc::new(
            Tokenizer::load(&a.out.join("tokenizer"))
                .with_context(|| format!("loading {}", a.out.join("tokenizer").display()))?,
        );
        let mut cursor = Cursor(0);
        let mut tr =
            Trainer::resume(&a.out, &mut cursor, record.as_ref().map(|r| r.run_id.as_str()))?;
        eprintln!(
            "resuming {} at step {} ({} questions done)",
            a.out.display(),
            tr.step(),
            cursor.0
        );
        tr.apply_resume_flags(
            explicit,
            a.num_iterations,
            trainer::Cadence {
                eval_every: a.eval_every,
                save_every: a.save_every,
                sample_every: 0,
            },
        )?;
        (tr, tok, f, cursor.0, lock)
    } else {
        let sft = a.sft.as_ref().context("--sft is required for a new run")?;
        let (ckpt, _) = trainer::latest_in(sft)?.with_context(|| {
            format!(
                "--sft {}: no checkpoint (no latest.json); run `train sft` first",
                sft.display()
            )
        })?;
        let state = trainer::read_state(&ckpt)?;
        let tok = Arc::new(
            Tokenizer::load(&sft.join("tokenizer"))
                .with_context(|| format!("loading {}", sft.join("tokenizer").display()))?,
        );
        let opts = Options::from_flags(&given)?;
        let train = Gsm8k::load(&train_path)?;
        let per_epoch = train.len() / opts.examples_per_step;
        let num_iterations = match a.num_iterations {
            Some(0) => bail!("--num-iterations must be positive"),
            Some(n) => n,
            None if per_epoch * a.num_epochs == 0 => bail!(
                "{} has {} problems: fewer than --examples-per-step {}",
                train_path.display(),
                train.len(),
                opts.examples_per_step
            ),
            None => per_epoch * a.num_epochs,
        };
        let model_path = ckpt.join("model.safetensors");
        let (gpt, meta) = load_model(&model_path)?;
        if meta.config != state.settings.model {
            bail!("{} holds a model of another config than its state.json", model_path.display());
        }
        if gpt.config().vocab_size != tok.vocab_size() {
            bail!(
                "the model's vocab ({}) differs from its tokenizer's ({})",
                gpt.config().vocab_size,
                tok.vocab_size()
            );
        }
        let s = Settings {
            model: meta.config.clone(),
            device_batch_size: opts.device_batch_size,
            grad_accum_steps: opts.examples_per_step * opts.num_samples / opts.device_batch_size,
            num_iterations,
            warmup_steps: 0,
            warmdown_ratio: 0.0,
            final_lr_frac: 0.0,
            unembedding_lr: a.unembedding_lr,
            embedding_lr: a.embedding_lr,
            matrix_lr: a.matrix_lr,
            scalar_lr: 0.5,
            weight_decay: a.weight_decay,
            lr_schedule: LrSchedule::Linear,
            lr_scale: a.init_lr_frac as f32,
            eval_every: a.eval_every,
            save_every: a.save_every,
            sample_every: 0,
            seed: a.seed,
        };
        // nanochat's RL starts a fresh optimizer (it does not load the SFT one).
        let opt = MuonAdamW::new(s.param_groups(), gpt.params())?;
        let lock = rundir::begin_new(&a.out, a.run.overwrite)?;
        tok.save(&a.out.join("tokenizer"))?;
        let details = serde_json::json!({
            "sft": { "dir": sft, "checkpoint": ckpt, "step": state.step, "run_id": state.run_id, "config": s.model },
            "train_problems": train.len(),
        });
        let record = RunRecord::new(
            &a.out,
            "rl",
            given.clone(),
            std::slice::from_ref(&train_path),
            std::slice::from_ref(&val_path),
            0,
            details,
        )?;
        rundir::write_run_file(&a.out, &record)?;
        eprintln!(
            "rl: {} steps of {} questions x {} samples (device batch {}), LRs x {}, {} problems",
            num_iterations,
            opts.examples_per_step,
            opts.num_samples,
            opts.device_batch_size,
            a.init_lr_frac,
            train.len()
        );
        (Trainer::start(s, gpt, opt, &a.out, &record.run_id)?, tok, given, 0, lock)
    };
    if trainer.step() >= trainer.settings.num_iterations {
        eprintln!(
            "{} is complete at step {}; nothing to do (extend it with --num-iterations)",
            a.out.display(),
            trainer.step()
        );
        return Ok(());
    }
    let train: Arc<dyn Task> = Arc::new(Gsm8k::load(Path::new(&f["train_data"]))?);
    let val: Arc<dyn Task> = Arc::new(Gsm8k::load(Path::new(&f["val_data"]))?);
    let mut rl = Rl { tok, train, val: Some(val), opts: Options::from_flags(&f)?, examples };
    trainer = trainer.with_device(a.device)?;
    let n = trainer.settings.num_iterations;
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step() as u64);
    let summary = rl.run(&mut trainer, |step, log| {
        bar.set_position(step as u64 + 1);
        bar.set_message(format!(
            "reward {:.3} | loss {:+.5} | length {:.0}",
            log.reward, log.loss, log.sequence_length
        ));
    })?;
    bar.finish();
    crate::plot::loss_curve(trainer.run_dir())?;
    reward_plot(trainer.run_dir())?;
    eprintln!(
        "done: {} steps, last reward {}, pass@1 {}, {} tokens generated in {:.1}s; run in {}",
        summary.steps,
        summary.final_reward.map_or("-".into(), |r| format!("{r:.4}")),
        summary.pass_at_1.map_or("-".into(), |p| format!("{p:.4}")),
        summary.generated_tokens,
        summary.seconds,
        a.out.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// RUN_DIR/reward.svg: the mean reward per step and pass@1 at each evaluation.
fn reward_plot(run_dir: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).context("reading metrics.jsonl")?;
    let (mut reward, mut pass1) = (Vec::new(), Vec::new());
    for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(r) = v["reward"].as_f64() {
            reward.push((step, r));
        }
        if let Some(p) = v["pass@1"].as_f64() {
            pass1.push((step, p));
        }
    }
    crate::plot::curves(
        &run_dir.join("reward.svg"),
        "RL: mean reward per step and pass@1 on held-out problems",
        &[("reward".into(), reward), ("pass@1".into(), pass1)],
    )
}
