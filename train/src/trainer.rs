//! The pretraining loop (docs/reference.md §6-§7), independent of where batches come from: gradient
//! accumulation, schedules, MuonAdamW, periodic evaluation and samples, checkpoints, resume.
//!
//! Run directory:
//! - `metrics.jsonl`: one JSON line per step (`{"step","loss","lr_mult","tok_per_s",...}`) and per
//!   evaluation (`{"step","val_bpb"}`);
//! - `step_NNNNNN/`: a checkpoint (`model.safetensors`, `optimizer.safetensors`, `state.json` with
//!   the step, the batch source's state and the settings), complete before `latest.json` names it;
//! - `latest.json`: the newest complete checkpoint, written atomically, so a crash at any moment
//!   leaves a resumable run. Resuming continues bit-identically: same batches, same losses.
//!
//! Every checkpoint carries the id of the run that wrote it (see rundir.rs). The retention keeps
//! the newest checkpoint and the one before it and deletes older ones of the same run only: a
//! checkpoint copied in from elsewhere is never deleted, and never resumed from either.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Device, GroupKind, Ids, MuonAdamW, Reduction, mem};
use femtochat_model::checkpoint::{
    Latest, latest_checkpoint, load_model, save_model, save_optimizer, write_atomic,
};
use femtochat_model::optim::{OptimizerConfig, param_groups};
use femtochat_model::schedule::Schedule;
use femtochat_model::{GPTConfig, Gpt};
use serde::{Deserialize, Serialize};

/// One micro-batch: inputs and targets, both (B, T) row-major; -1 targets are ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<i32>,
}

/// Where training batches come from. `state`/`restore` make a resumed run see exactly the
/// batches an uninterrupted one would have.
pub trait BatchSource {
    fn next_batch(&mut self) -> Result<Batch>;
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
}

/// Validation bits per byte of a model.
pub trait Validator {
    fn val_bpb(&mut self, gpt: &Gpt) -> Result<f64>;
}

/// Metrics computed every few steps and at the end of a run (CORE during pretraining).
pub trait Evaluator {
    /// Named metrics of the model at `step`; each is logged to metrics.jsonl.
    fn evaluate(&mut self, step: usize, gpt: &Gpt) -> Result<Vec<(String, f64)>>;
}

/// Everything that defines a run (stored in every checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub model: GPTConfig,
    pub device_batch_size: usize,
    pub grad_accum_steps: usize,
    pub num_iterations: usize,
    pub warmup_steps: usize,
    pub warmdown_ratio: f64,
    pub final_lr_frac: f64,
    pub unembedding_lr: f32,
    pub embedding_lr: f32,
    pub matrix_lr: f32,
    pub scalar_lr: f32,
    /// Muon weight decay at step 0 (cosine-decayed to 0 by the base schedule; constant in the
    /// chat schedule, where nanochat's SFT sets it to 0).
    pub weight_decay: f32,
    /// Which of nanochat's schedules drives the learning rate and Muon momentum.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Multiplies every group's learning rate, the fixed ones included (nanochat's SFT
    /// `--init-lr-frac`); 1 in base training.
    #[serde(default = "one")]
    pub lr_scale: f32,
    /// Evaluate every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Print samples every N steps (0 = never).
    pub sample_every: usize,
    pub seed: u64,
}

fn one() -> f32 {
    1.0
}

/// nanochat's two schedule families.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// base_train: warmup over `warmup_steps`, flat, linear warmdown over the last
    /// `warmdown_ratio` of the steps to `final_lr_frac`; Muon momentum 0.85 -> 0.97 over 400
    /// steps, down to 0.90 in the warmdown; Muon weight decay cosine-decayed to 0.
    #[default]
    Base,
    /// chat_sft (and the old mid_train): the same shape over the fraction of the run done
    /// (warmup over `warmup_ratio`, warmdown over the last `warmdown_ratio`); Muon momentum
    /// 0.85 -> 0.95 over 300 steps; Muon weight decay constant.
    Chat { warmup_ratio: f64 },
    /// chat_rl: the LR ramps linearly from 1 at step 0 down to 0 (`1 - it / num_iterations`);
    /// Muon momentum stays at setup_optimizer's 0.95; weight decay constant.
    Linear,
}

/// Muon momentum of the chat schedule: 0.85 -> 0.95 over the first 300 steps.
fn chat_momentum(it: usize) -> f64 {
    let frac = (it as f64 / 300.0).min(1.0);
    0.85 + (0.95 - 0.85) * frac
}

impl Settings {
    pub fn tokens_per_step(&self) -> usize {
        self.device_batch_size * self.model.sequence_len * self.grad_accum_steps
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            num_iterations: self.num_iterations,
            warmup_steps: self.warmup_steps,
            warmdown_ratio: self.warmdown_ratio,
            final_lr_frac: self.final_lr_frac,
        }
    }

    /// (LR multiplier, Muon momentum, Muon weight decay) at step `it`.
    pub fn schedule_at(&self, it: usize) -> (f64, f64, f64) {
        match self.lr_schedule {
            LrSchedule::Base => {
                let s = self.schedule();
                (
                    s.lr_multiplier(it),
                    s.muon_momentum(it),
                    s.muon_weight_decay(it, self.weight_decay as f64),
                )
            }
            LrSchedule::Chat { warmup_ratio } => {
                // The fraction of the run done once this step is taken.
                let p = (it + 1) as f64 / self.num_iterations.max(1) as f64;
                let lrm = if p < warmup_ratio {
                    (p + 1e-8) / warmup_ratio
                } else if p <= 1.0 - self.warmdown_ratio {
                    1.0
                } else {
                    let decay = (p - (1.0 - self.warmdown_ratio)) / self.warmdown_ratio;
                    (1.0 - decay) + decay * self.final_lr_frac
                };
                (lrm, chat_momentum(it), self.weight_decay as f64)
            }
            LrSchedule::Linear => {
                let lrm = 1.0 - it as f64 / self.num_iterations.max(1) as f64;
                (lrm, 0.95, self.weight_decay as f64)
            }
        }
    }

    /// The MuonAdamW groups of this run: nanochat's `setup_optimizer` with these LRs, every LR
    /// then multiplied by `lr_scale`.
    pub fn param_groups(&self) -> Vec<femtochat_engine::ParamGroup> {
        let mut groups = param_groups(&self.model, &self.optimizer());
        for g in &mut groups {
            g.lr *= self.lr_scale;
            g.initial_lr *= self.lr_scale;
        }
        groups
    }

    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            unembedding_lr: self.unembedding_lr,
            embedding_lr: self.embedding_lr,
            matrix_lr: self.matrix_lr,
            scalar_lr: self.scalar_lr,
            weight_decay: self.weight_decay,
        }
    }
}

/// `step_NNNNNN/state.json`.
#[derive(Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub source: serde_json::Value,
    pub settings: Settings,
    /// The run that wrote this checkpoint (empty in checkpoints of older versions).
    #[serde(default)]
    pub run_id: String,
}

/// A checkpoint directory's state, naming the file on error.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join("state.json");
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// How often a run evaluates, checkpoints and samples (may change when a run is resumed).
#[derive(Clone, Copy, Debug)]
pub struct Cadence {
    pub eval_every: usize,
    pub save_every: usize,
    pub sample_every: usize,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: usize,
    /// Mean loss of the last step trained in this call (None when it trained no step).
    pub final_loss: Option<f32>,
    pub val_bpb: Option<f64>,
    pub tokens: usize,
    pub seconds: f64,
    pub tok_per_s: f64,
    /// High-water mark of host heap bytes over the steps (None where the binary does not count
    /// allocations), and of GPU buffer bytes.
    pub peak_host_bytes: Option<usize>,
    pub peak_gpu_bytes: u64,
}

/// Called every `sample_every` steps with the model; returns text to print.
pub type SampleHook<'a> = dyn FnMut(&Gpt) -> Result<Vec<String>> + 'a;

pub struct Trainer {
    pub settings: Settings,
    pub gpt: Gpt,
    pub opt: MuonAdamW,
    step: usize,
    run_dir: PathBuf,
    run_id: String,
    /// Step of the newest checkpoint on disk (None before the first one).
    saved_step: Option<usize>,
    /// Run every N steps (N > 0) and after the last step.
    evaluator: Option<(usize, Box<dyn Evaluator>)>,
    /// This rank's part of the optimizer when training over several ranks (`opt` is then
    /// empty): see dist/optim.rs.
    sharded: Option<crate::dist::optim::ShardedMuonAdamW>,
}

/// The newest checkpoint of `run_dir` named by `latest.json`, refusing a `latest.json` that
/// points outside the run directory.
pub fn latest_in(run_dir: &Path) -> Result<Option<(PathBuf, usize)>> {
    let Some((dir, step)) = latest_checkpoint(run_dir)? else { return Ok(None) };
    let name = dir.strip_prefix(run_dir).ok().and_then(|p| p.to_str()).unwrap_or_default();
    let plain = name.starts_with("step_")
        && name.len() > 5
        && name[5..].bytes().all(|b| b.is_ascii_digit());
    if !plain {
        bail!(
            "{} names {:?}, which is not a checkpoint directory of this run (step_NNNNNN); \
             refusing to read or delete outside {}",
            run_dir.join("latest.json").display(),
            dir.display(),
            run_dir.display()
        );
    }
    Ok(Some((dir, step)))
}

impl Trainer {
    /// A fresh run in `run_dir` (created if needed), from a fresh initialisation.
    pub fn new(settings: Settings, run_dir: &Path, run_id: &str) -> Result<Trainer> {
        let gpt = Gpt::init(settings.model.clone(), settings.seed)?;
        let opt = MuonAdamW::new(settings.param_groups(), gpt.params())?;
        Trainer::start(settings, gpt, opt, run_dir, run_id)
    }

    /// A fresh run in `run_dir` from given weights and optimizer (fine-tuning a loaded model).
    pub fn start(
        settings: Settings,
        gpt: Gpt,
        opt: MuonAdamW,
        run_dir: &Path,
        run_id: &str,
    ) -> Result<Trainer> {
        fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let metrics = run_dir.join("metrics.jsonl");
        if crate::dist::is_lead() {
            fs::write(&metrics, b"").with_context(|| format!("writing {}", metrics.display()))?;
        }
        Ok(Trainer {
            settings,
            gpt,
            opt,
            step: 0,
            run_dir: run_dir.to_path_buf(),
            run_id: run_id.to_string(),
            saved_step: None,
            evaluator: None,
            sharded: None,
        })
    }

    /// Continue counting from `step` (a run started from weights trained elsewhere, e.g. a
    /// nanochat import, whose schedules are at that step).
    pub fn at_step(mut self, step: usize) -> Trainer {
        self.step = step;
        self
    }

    /// The newest checkpoint of `run_dir`, if any: (directory, step).
    pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, usize)>> {
        latest_in(run_dir)
    }

    /// Continue the run in `run_dir` from its newest checkpoint; restores `source` to where it
    /// was. With `run_id`, the checkpoint must have been written by that run.
    pub fn resume(
        run_dir: &Path,
        source: &mut dyn BatchSource,
        run_id: Option<&str>,
    ) -> Result<Trainer> {
        let (dir, _) = Trainer::latest(run_dir)?
            .with_context(|| format!("{} has no checkpoint to resume from", run_dir.display()))?;
        let state = read_state(&dir)?;
        if let Some(id) = run_id
            && state.run_id != id
        {
            bail!(
                "{} was not written by this run (its run id is {:?}, the run's is {id:?}): it \
                 was copied in from elsewhere. Move it out, or point latest.json back at a \
                 checkpoint of this run",
                dir.display(),
                state.run_id
            );
        }
        let model_path = dir.join("model.safetensors");
        let (gpt, meta) = load_model(&model_path)?;
        if meta.config != state.settings.model {
            bail!(
                "{} holds a model of another config than its state.json ({:?} vs {:?})",
                model_path.display(),
                meta.config,
                state.settings.model
            );
        }
        let settings = state.settings;
        let mut opt = MuonAdamW::new(settings.param_groups(), gpt.params())?;
        if !crate::dist::optim::load_any(&dir, &mut opt)? {
            bail!("{} holds no optimizer state", dir.display());
        }
        source.restore(&state.source).context("restoring the data loader")?;
        // Drop metrics logged after the checkpoint: the resumed run logs those steps again.
        let metrics = run_dir.join("metrics.jsonl");
        let kept: String = fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| (s as usize) < state.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if crate::dist::is_lead() {
            write_atomic(&metrics, kept.as_bytes())?;
        }
        Ok(Trainer {
            settings,
            gpt,
            opt,
            step: state.step,
            run_dir: run_dir.to_path_buf(),
            run_id: state.run_id,
            saved_step: Some(state.step),
            evaluator: None,
            sharded: None,
        })
    }

    /// Train on `device` (the optimizer state is keyed by name and stays put).
    pub fn with_device(mut self, device: Device) -> Result<Trainer> {
        self.gpt = self.gpt.to_device(device)?;
        Ok(self)
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// Apply what a resumed run may change, for the flags the user gave (`explicit` arg ids):
    /// a new length (`num_iterations`, not below the steps done; the schedules are then those
    /// of the new length from here on) and the eval/save/sample cadences.
    pub fn apply_resume_flags(
        &mut self,
        explicit: &std::collections::BTreeSet<String>,
        num_iterations: Option<usize>,
        cadence: Cadence,
    ) -> Result<()> {
        if explicit.contains("num_iterations")
            && let Some(n) = num_iterations
            && n != self.settings.num_iterations
        {
            if n <= self.step {
                bail!(
                    "--num-iterations {n}: the run is already at step {}; give more steps",
                    self.step
                );
            }
            eprintln!(
                "extending the run from {} to {n} steps: the LR, momentum and weight-decay \
                 schedules are recomputed for {n} steps from step {} on",
                self.settings.num_iterations, self.step
            );
            self.settings.num_iterations = n;
        }
        if explicit.contains("eval_every") {
            self.settings.eval_every = cadence.eval_every;
        }
        if explicit.contains("save_every") {
            self.settings.save_every = cadence.save_every;
        }
        if explicit.contains("sample_every") {
            self.settings.sample_every = cadence.sample_every;
        }
        Ok(())
    }

    /// Run `evaluator` every `every` steps (from step `every` on; 0 = never) and at the end.
    pub fn set_evaluator(&mut self, every: usize, evaluator: Box<dyn Evaluator>) {
        self.evaluator = (every > 0).then_some((every, evaluator));
    }

    /// The evaluator's metrics at step `at`, logged.
    fn run_evaluator(&mut self, at: usize) -> Result<()> {
        if let Some((_, ev)) = self.evaluator.as_mut() {
            let mut line = serde_json::json!({ "step": at });
            for (name, value) in ev.evaluate(at, &self.gpt)? {
                line[name] = serde_json::json!(value);
            }
            self.log(line)?;
        }
        Ok(())
    }

    /// Append one JSON line to `metrics.jsonl`.
    pub fn log(&self, line: serde_json::Value) -> Result<()> {
        if !crate::dist::is_lead() {
            return Ok(());
        }
        let path = self.run_dir.join("metrics.jsonl");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Write a checkpoint of the current step (with the batch source at `source_state`) and
    /// point `latest.json` at it; keeps the previous one, deletes older ones of this run. A
    /// failure (a full disk, a lost GPU) leaves `latest.json` on the previous checkpoint.
    pub fn save(&mut self, source_state: serde_json::Value) -> Result<PathBuf> {
        let name = format!("step_{:06}", self.step);
        let dir = self.run_dir.join(&name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let meta = serde_json::json!({ "step": self.step, "run_id": self.run_id });
        let lead = crate::dist::is_lead();
        // Over several ranks: rank 0 writes the model, every rank its optimizer shard; rank 0
        // names the checkpoint in latest.json only once every rank has written its shard.
        let written = (|| -> Result<()> {
            if lead {
                save_model(&dir.join("model.safetensors"), &self.gpt, &meta)?;
            }
            // A directory rewritten by a resumed run may hold the other layout's file from
            // before: remove it, since a load prefers optimizer.safetensors.
            let single = dir.join("optimizer.safetensors");
            match &self.sharded {
                Some(sh) => {
                    if lead && single.exists() {
                        fs::remove_file(&single)?;
                    }
                    sh.save_shard(&dir)?;
                }
                None => {
                    save_optimizer(&single, &self.opt)?;
                    let shard = crate::dist::optim::shard_path(&dir, 0);
                    if shard.exists() {
                        fs::remove_file(&shard)?;
                    }
                }
            }
            Ok(())
        })();
        crate::dist::agree("writing the checkpoint", written)?;
        if !lead {
            self.saved_step = Some(self.step);
            return Ok(dir);
        }
        let state = CheckpointState {
            step: self.step,
            source: source_state,
            settings: self.settings.clone(),
            run_id: self.run_id.clone(),
        };
        write_atomic(&dir.join("state.json"), &serde_json::to_vec_pretty(&state)?)?;
        let previous = Trainer::latest(&self.run_dir)?;
        write_atomic(
            &self.run_dir.join("latest.json"),
            &serde_json::to_vec(&Latest { step: self.step, dir: name })?,
        )?;
        self.saved_step = Some(self.step);
        // Keep the previous checkpoint as a fallback, drop older ones this run wrote.
        for entry in fs::read_dir(&self.run_dir)? {
            let p = entry?.path();
            let is_ckpt = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_"));
            let keep = p == dir || previous.as_ref().is_some_and(|(d, _)| *d == p);
            if is_ckpt && !keep && read_state(&p).is_ok_and(|st| st.run_id == self.run_id) {
                fs::remove_dir_all(&p).ok();
            }
        }
        Ok(dir)
    }

    /// Take optimizer step `self.step` with gradients computed elsewhere (a stage whose loss is
    /// not the trainer's cross-entropy, such as RL's policy gradient): the schedules at this
    /// step, the update, the step counted. Returns (LR multiplier, Muon momentum, weight decay).
    /// One process only: the optimizer must not be sharded over ranks.
    pub fn apply_grads(&mut self, grads: &femtochat_engine::Grads) -> Result<(f32, f32, f32)> {
        if self.sharded.is_some() {
            bail!("apply_grads takes whole gradients on one process; the optimizer is sharded");
        }
        let (lrm, momentum, wd) = self.settings.schedule_at(self.step);
        let (lrm, momentum, wd) = (lrm as f32, momentum as f32, wd as f32);
        for g in self.opt.groups_mut() {
            g.lr = g.initial_lr * lrm;
            if let GroupKind::Muon { momentum: m, .. } = &mut g.kind {
                *m = momentum;
                g.weight_decay = wd;
            }
        }
        self.opt.step(self.gpt.params(), grads)?;
        self.step += 1;
        Ok((lrm, momentum, wd))
    }

    /// The run directory this trainer writes.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// On a failed batch: keep the work done so far (a checkpoint of the last completed step,
    /// with the loader where that step left it), then report both.
    fn stop_on_data_error(
        &mut self,
        err: anyhow::Error,
        state: serde_json::Value,
    ) -> anyhow::Error {
        if self.step == 0 || self.saved_step == Some(self.step) {
            let kept = match self.saved_step {
                Some(s) => format!("the last checkpoint is step {s}"),
                None => "no step was trained, so no checkpoint was written".into(),
            };
            return err.context(format!("the data failed at step {}; {kept}", self.step));
        }
        match self.save(state) {
            Ok(dir) => err.context(format!(
                "the data failed at step {}; saved {} first: fix the data (or pass --skip-bad) \
                 and continue with --resume",
                self.step,
                dir.display()
            )),
            Err(e) => err.context(format!(
                "the data failed at step {}, and saving a checkpoint failed too: {e:#}",
                self.step
            )),
        }
    }

    /// Over several ranks, keep only this rank's part of the optimizer (once).
    fn shard_optimizer(&mut self) -> Result<()> {
        let w = crate::dist::world();
        if w.size() > 1 && self.sharded.is_none() {
            let params = self.gpt.params();
            let sh =
                crate::dist::optim::ShardedMuonAdamW::new(&self.opt, params, w.rank(), w.size())?;
            if w.rank() == 0 {
                eprintln!(
                    "optimizer state split over {} ranks: rank 0 holds {} of {} values",
                    w.size(),
                    sh.state_len(),
                    self.opt.state_dict()?.1.values().map(Vec::len).sum::<usize>()
                );
            }
            self.opt = MuonAdamW::new(Vec::new(), params)?;
            self.sharded = Some(sh);
        }
        Ok(())
    }

    /// Train until `num_iterations`, evaluating, sampling and checkpointing on the way.
    /// `progress` sees (step, loss, tok_per_s) after every step.
    pub fn train(
        &mut self,
        source: &mut dyn BatchSource,
        mut validator: Option<&mut dyn Validator>,
        mut sample: Option<&mut SampleHook>,
        mut progress: impl FnMut(usize, f32, f64),
    ) -> Result<Summary> {
        let s = self.settings.clone();
        let (b, t) = (s.device_batch_size, s.model.sequence_len);
        let flops_per_token = s.model.flops_per_token();
        let start = Instant::now();
        let first_step = self.step;
        let mut last_loss = None;
        let mut val_bpb = None;
        let (mut peak_host, mut peak_gpu) = (0, 0);
        let lead = crate::dist::is_lead();
        let local_accum = crate::dist::local_accum(s.grad_accum_steps)?;
        self.shard_optimizer()?;
        while self.step < s.num_iterations {
            let it = self.step;
            if s.eval_every > 0
                && lead
                && it.is_multiple_of(s.eval_every)
                && let Some(v) = validator.as_deref_mut()
            {
                let bpb = v.val_bpb(&self.gpt)?;
                self.log(serde_json::json!({ "step": it, "val_bpb": bpb }))?;
                val_bpb = Some(bpb);
            }
            if it > 0
                && lead
                && self.evaluator.as_ref().is_some_and(|(every, _)| it.is_multiple_of(*every))
            {
                self.run_evaluator(it)?;
            }
            if s.sample_every > 0
                && lead
                && it > 0
                && it.is_multiple_of(s.sample_every)
                && let Some(hook) = sample.as_deref_mut()
            {
                for line in hook(&self.gpt)? {
                    eprintln!("[step {it}] {line}");
                }
            }
            // Over several ranks the others wait for rank 0's evaluation here, with no time
            // limit (the same condition on every rank, whatever each one evaluates).
            let evaluated = (s.eval_every > 0 && it.is_multiple_of(s.eval_every))
                || (it > 0 && self.evaluator.as_ref().is_some_and(|(e, _)| it.is_multiple_of(*e)))
                || (s.sample_every > 0 && it > 0 && it.is_multiple_of(s.sample_every));
            if evaluated {
                crate::dist::wait_for_lead()?;
            }
            // Where the data stands before this step: what a checkpoint of step `it` records.
            let step_state = source.state();
            mem::reset_peaks();
            let t0 = Instant::now();
            let mut grads: Option<femtochat_engine::Grads> = None;
            let mut loss_sum = 0.0f64;
            let mut learned_batches = 0usize;
            for _ in 0..local_accum {
                let batch = match source.next_batch() {
                    Ok(b) => b,
                    Err(e) => return Err(self.stop_on_data_error(e, step_state)),
                };
                if batch.inputs.len() != b * t || batch.targets.len() != b * t {
                    bail!("batch source gave {} tokens, expected {b}x{t}", batch.inputs.len());
                }
                // A micro-batch with no learned target (SFT rows whose assistant turns were all
                // truncated away) has no loss: it contributes a zero gradient, as a mean over
                // its zero targets would otherwise be 0/0.
                if batch.targets.iter().all(|&x| x < 0) {
                    continue;
                }
                learned_batches += 1;
                let idx = Ids::new(batch.inputs, &[b, t])?;
                let loss = self.gpt.loss(&idx, &batch.targets, Reduction::Mean)?;
                let value = loss.item()?;
                if !value.is_finite() {
                    let last = Trainer::latest(&self.run_dir)?
                        .map(|(d, st)| {
                            format!("the last good checkpoint is {} (step {st})", d.display())
                        })
                        .unwrap_or_else(|| "no checkpoint was written yet".into());
                    bail!(
                        "non-finite loss ({value}) at step {it}; stopping without saving: {last}"
                    );
                }
                loss_sum += value as f64;
                // Mean over micro-batches: scale each loss before backward.
                let g = loss.scale(1.0 / s.grad_accum_steps as f32)?.backward()?;
                match grads.as_mut() {
                    None => grads = Some(g),
                    Some(acc) => acc.accumulate(g)?,
                }
            }
            let grads = grads.unwrap_or_default();
            let (loss_sum, learned_batches) = crate::dist::sum_loss(loss_sum, learned_batches)?;
            let (lrm, momentum, wd) = s.schedule_at(it);
            let (lrm, momentum, wd) = (lrm as f32, momentum as f32, wd as f32);
            let groups = match self.sharded.as_mut() {
                Some(sh) => sh.groups_mut(),
                None => self.opt.groups_mut(),
            };
            for g in groups {
                g.lr = g.initial_lr * lrm;
                if let GroupKind::Muon { momentum: m, .. } = &mut g.kind {
                    *m = momentum;
                    g.weight_decay = wd;
                }
            }
            match self.sharded.as_mut() {
                Some(sh) => sh.step(crate::dist::world(), self.gpt.params(), &grads)?,
                None => self.opt.step(self.gpt.params(), &grads)?,
            }
            drop(grads);
            self.step += 1;
            let loss = if learned_batches == 0 {
                f32::NAN
            } else {
                (loss_sum / learned_batches as f64) as f32
            };
            last_loss = Some(loss);
            let dt = t0.elapsed().as_secs_f64();
            let tok_per_s = s.tokens_per_step() as f64 / dt;
            self.log(serde_json::json!({
                "step": it, "loss": loss, "lr_mult": lrm, "muon_momentum": momentum,
                "muon_wd": wd, "tok_per_s": tok_per_s, "tflops": flops_per_token * tok_per_s / 1e12,
                "dt_ms": dt * 1e3, "peak_host_bytes": mem::host_counting().then(mem::host_peak_bytes),
                "peak_gpu_bytes": mem::gpu_peak_bytes(),
            }))?;
            peak_host = peak_host.max(mem::host_peak_bytes());
            peak_gpu = peak_gpu.max(mem::gpu_peak_bytes());
            progress(it, loss, tok_per_s);
            if s.save_every > 0
                && self.step.is_multiple_of(s.save_every)
                && self.step < s.num_iterations
            {
                self.save(source.state())?;
            }
        }
        if lead && let Some(v) = validator {
            let bpb = v.val_bpb(&self.gpt)?;
            self.log(serde_json::json!({ "step": self.step, "val_bpb": bpb }))?;
            val_bpb = Some(bpb);
        }
        if lead {
            self.run_evaluator(self.step)?;
        }
        crate::dist::wait_for_lead()?;
        self.save(source.state())?;
        if lead
            && let Some(sh) = &self.sharded
            && self.step > first_step
        {
            let w = crate::dist::world();
            eprintln!(
                "communication over {} ranks: {} bytes sent per step by rank 0 ({} predicted)",
                w.size(),
                w.bytes_sent() / (self.step - first_step) as u64,
                sh.bytes_per_step()
            );
        }
        let seconds = start.elapsed().as_secs_f64();
        let tokens = (self.step - first_step) * s.tokens_per_step();
        Ok(Summary {
            steps: self.step,
            final_loss: last_loss,
            val_bpb,
            tokens,
            seconds,
            tok_per_s: tokens as f64 / seconds.max(1e-9),
            peak_host_bytes: mem::host_counting().then_some(peak_host),
            peak_gpu_bytes: peak_gpu,
        })
    }
}

/// `Trainer::train` with a progress bar on stderr (loss, tok/s, TFLOP/s, MFU with
/// `peak_flops`), then the loss plot and the summary: one line on stderr, one JSON line on
/// stdout. Shared by every training stage.
pub fn train_with_progress(
    trainer: &mut Trainer,
    source: &mut dyn BatchSource,
    validator: Option<&mut dyn Validator>,
    sample: Option<&mut SampleHook>,
    peak_flops: Option<f64>,
) -> Result<Summary> {
    let s = trainer.settings.clone();
    let lead = crate::dist::is_lead();
    let bar = if lead {
        indicatif::ProgressBar::new(s.num_iterations as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step() as u64);
    let flops = s.model.flops_per_token();
    let summary = trainer.train(source, validator, sample, |step, loss, tps| {
        bar.set_position(step as u64 + 1);
        let mfu =
            peak_flops.map_or(String::new(), |p| format!(" | MFU {:.1}%", 100.0 * flops * tps / p));
        bar.set_message(format!(
            "loss {loss:.4} | {tps:.0} tok/s | {:.2} TFLOP/s{mfu}",
            flops * tps / 1e12
        ));
    })?;
    bar.finish();
    if !lead {
        return Ok(summary);
    }
    crate::plot::loss_curve(&trainer.run_dir)?;
    eprintln!(
        "done: {} steps, final loss {}, val bpb {}, {} tokens in {:.1}s ({:.0} tok/s); run in {}",
        summary.steps,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.val_bpb.map_or("-".into(), |b| format!("{b:.4}")),
        summary.tokens,
        summary.seconds,
        summary.tok_per_s,
        trainer.run_dir.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic batches from a counter; fails on purpose at batch `fail_at` (a crash).
    struct Counter {
        next: u64,
        fail_at: Option<u64>,
        b: usize,
        t: usize,
        vocab: u32,
    }

    impl BatchSource for Counter {
        fn next_batch(&mut self) -> Result<Batch> {
            if self.fail_at == Some(self.next) {
                bail!("simulated crash");
            }
            let n = self.b * self.t;
            let base = self.next as u32 * 7;
            let row: Vec<u32> = (0..=n as u32).map(|i| (base + i * i) % self.vocab).collect();
            self.next += 1;
            Ok(Batch {
                inputs: row[..n].to_vec(),
                targets: row[1..].iter().map(|&x| x as i32).collect(),
            })
        }
        fn state(&self) -> serde_json::Value {
            serde_json::json!({ "next": self.next })
        }
        fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
            self.next = state["next"].as_u64().context("no `next`")?;
            Ok(())
        }
    }

    fn settings() -> Settings {
        Settings {
            model: GPTConfig {
                sequence_len: 16,
                vocab_size: 40,
                n_layer: 2,
                n_head: 2,
                n_kv_head: 2,
                n_embd: 32,
                window_pattern: "L".into(),
            },
            device_batch_size: 2,
            grad_accum_steps: 2,
            num_iterations: 6,
            warmup_steps: 2,
            warmdown_ratio: 0.5,
            final_lr_frac: 0.05,
            unembedding_lr: 0.004,
            embedding_lr: 0.2,
            matrix_lr: 0.02,
            scalar_lr: 0.5,
            weight_decay: 0.1,
            lr_schedule: LrSchedule::Base,
            lr_scale: 1.0,
            eval_every: 0,
            save_every: 3,
            sample_every: 0,
            seed: 42,
        }
    }

    fn source(fail_at: Option<u64>) -> Counter {
        Counter { next: 0, fail_at, b: 2, t: 16, vocab: 40 }
    }

    fn losses(dir: &Path) -> Vec<(u64, String)> {
        fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
            .collect()
    }

    #[test]
    fn resumed_run_equals_uninterrupted_run() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut whole = Trainer::new(settings(), a.path(), "run").unwrap();
        let summary = whole.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        assert_eq!(summary.steps, 6);

        // The data fails during step 4 (its 9th micro-batch), after the step-3 checkpoint: the
        // trainer saves step 4 (the loader where step 4 starts) before stopping.
        let mut crashed = Trainer::new(settings(), b.path(), "run").unwrap();
        let err = crashed.train(&mut source(Some(8)), None, None, |_, _, _| {}).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("simulated crash") && msg.contains("step_000004"), "{msg}");
        assert_eq!(Trainer::latest(b.path()).unwrap().unwrap().1, 4);
        let mut src = source(None);
        let mut resumed = Trainer::resume(b.path(), &mut src, Some("run")).unwrap();
        assert_eq!(resumed.step(), 4);
        resumed.train(&mut src, None, None, |_, _, _| {}).unwrap();

        assert_eq!(losses(a.path()), losses(b.path()));
        assert_eq!(losses(a.path()).len(), 6);
        for (n, p) in whole.gpt.params().iter() {
            let q = resumed.gpt.params().get(n).unwrap();
            assert!(
                p.to_vec().iter().zip(q.to_vec()).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{n}"
            );
        }
        // The final checkpoint loads and names the last step.
        assert_eq!(Trainer::latest(a.path()).unwrap().unwrap().1, 6);
    }

    /// Only checkpoints of this run are deleted by the retention; a foreign one copied in is
    /// kept, and resuming from it is refused.
    #[test]
    fn retention_keeps_foreign_checkpoints_and_resume_refuses_them() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut other = Trainer::new(settings(), a.path(), "other").unwrap();
        other.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        let mut tr = Trainer::new(settings(), b.path(), "run").unwrap();
        fs::create_dir_all(b.path().join("step_000001")).unwrap();
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            fs::copy(a.path().join("step_000006").join(f), b.path().join("step_000001").join(f))
                .unwrap();
        }
        tr.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        let mut names: Vec<String> = fs::read_dir(b.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("step_"))
            .collect();
        names.sort();
        assert_eq!(names, ["step_000001", "step_000003", "step_000006"]);
        // latest.json pointed at the foreign checkpoint: resume refuses it.
        fs::write(b.path().join("latest.json"), r#"{"step":1,"dir":"step_000001"}"#).unwrap();
        let err = Trainer::resume(b.path(), &mut source(None), Some("run")).err().unwrap();
        assert!(err.to_string().contains("not written by this run"), "{err}");
        // latest.json may not point outside the run directory.
        fs::write(b.path().join("latest.json"), r#"{"step":1,"dir":"../x"}"#).unwrap();
        let err = Trainer::resume(b.path(), &mut source(None), None).err().unwrap();
        assert!(err.to_string().contains("not a checkpoint directory"), "{err}");
    }

    /// The chat schedule: progress-based LR with nanochat's SFT defaults, momentum 0.85 -> 0.95
    /// over 300 steps, constant weight decay.
    #[test]
    fn chat_schedule_points() {
        let s = Settings {
            num_iterations: 10,
            warmdown_ratio: 0.5,
            final_lr_frac: 0.0,
            weight_decay: 0.0,
            lr_schedule: LrSchedule::Chat { warmup_ratio: 0.0 },
            ..settings()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s.schedule_at(0).0, 1.0));
        assert!(close(s.schedule_at(4).0, 1.0), "progress 0.5 is still flat");
        assert!(close(s.schedule_at(6).0, 0.6));
        assert!(close(s.schedule_at(9).0, 0.0));
        assert!(close(s.schedule_at(0).1, 0.85));
        assert!(close(s.schedule_at(150).1, 0.90));
        assert!(close(s.schedule_at(600).1, 0.95));
        assert!(close(s.schedule_at(3).2, 0.0));
    }

    /// Six optimizer steps on the GPU (lavapipe in CI) track the CPU run's losses.
    #[test]
    fn gpu_training_tracks_cpu_losses() {
        if let Err(e) = Device::Gpu.ensure_available() {
            assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
            return;
        }
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut cpu = Trainer::new(settings(), a.path(), "run").unwrap();
        cpu.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        let mut gpu =
            Trainer::new(settings(), b.path(), "run").unwrap().with_device(Device::Gpu).unwrap();
        assert_eq!(gpu.gpt.device(), Device::Gpu);
        gpu.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        let (lc, lg) = (losses(a.path()), losses(b.path()));
        assert_eq!(lc.len(), 6);
        assert_eq!(lc.len(), lg.len());
        for ((sc, c), (sg, g)) in lc.iter().zip(&lg) {
            let (c, g): (f64, f64) = (c.parse().unwrap(), g.parse().unwrap());
            assert_eq!(sc, sg);
            assert!((c - g).abs() < 1e-3 * c.abs(), "step {sc}: cpu loss {c}, gpu loss {g}");
        }
    }

    /// The evaluator runs every N steps and once after the last one; its metrics are logged.
    #[test]
    fn evaluator_runs_every_n_steps_and_at_the_end() {
        struct Steps(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);
        impl Evaluator for Steps {
            fn evaluate(&mut self, step: usize, _: &Gpt) -> Result<Vec<(String, f64)>> {
                self.0.lock().unwrap().push(step);
                Ok(vec![("core".into(), step as f64 / 10.0)])
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tr =
            Trainer::new(Settings { num_iterations: 5, ..settings() }, dir.path(), "run").unwrap();
        tr.set_evaluator(2, Box::new(Steps(seen.clone())));
        tr.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![2, 4, 5]);
        let logged: Vec<(u64, f64)> = fs::read_to_string(dir.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| Some((v["step"].as_u64()?, v["core"].as_f64()?)))
            .collect();
        assert_eq!(logged, vec![(2, 0.2), (4, 0.4), (5, 0.5)]);
    }

    #[test]
    fn non_finite_loss_is_reported_with_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut tr = Trainer::new(settings(), dir.path(), "run").unwrap();
        tr.gpt.params().get("lm_head.weight").unwrap().with_data_mut(|d| d[0] = f32::NAN).unwrap();
        let err = tr.train(&mut source(None), None, None, |_, _, _| {}).unwrap_err().to_string();
        assert!(err.contains("step 0") && err.contains("no checkpoint"), "{err}");
    }
}
