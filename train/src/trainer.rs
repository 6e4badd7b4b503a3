//! The pretraining loop (SPEC.md §6-§7), independent of where batches come from: gradient
//! accumulation, schedules, MuonAdamW, periodic evaluation and samples, checkpoints, resume.
//!
//! Run directory:
//! - `metrics.jsonl`: one JSON line per step (`{"step","loss","lr_mult","tok_per_s",...}`) and per
//!   evaluation (`{"step","val_bpb"}`);
//! - `step_NNNNNN/`: a checkpoint (`model.safetensors`, `optimizer.safetensors`, `state.json` with
//!   the step, the batch source's state and the settings), complete before `latest.json` names it;
//! - `latest.json`: the newest complete checkpoint, written atomically, so a crash at any moment
//!   leaves a resumable run. Resuming continues bit-identically: same batches, same losses.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Device, GroupKind, Ids, MuonAdamW, Reduction};
use femtochat_model::checkpoint::{
    Latest, latest_checkpoint, load_model, load_optimizer, save_model, save_optimizer, write_atomic,
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
    /// Muon weight decay at step 0 (cosine-decayed to 0).
    pub weight_decay: f32,
    /// Evaluate every N steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Print samples every N steps (0 = never).
    pub sample_every: usize,
    pub seed: u64,
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

    fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            unembedding_lr: self.unembedding_lr,
            embedding_lr: self.embedding_lr,
            matrix_lr: self.matrix_lr,
            scalar_lr: self.scalar_lr,
            weight_decay: self.weight_decay,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    source: serde_json::Value,
    settings: Settings,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f32,
    pub val_bpb: Option<f64>,
    pub tokens: usize,
    pub seconds: f64,
    pub tok_per_s: f64,
}

/// Called every `sample_every` steps with the model; returns text to print.
pub type SampleHook<'a> = dyn FnMut(&Gpt) -> Result<Vec<String>> + 'a;

pub struct Trainer {
    pub settings: Settings,
    pub gpt: Gpt,
    opt: MuonAdamW,
    step: usize,
    run_dir: PathBuf,
}

impl Trainer {
    /// A fresh run in `run_dir` (created if needed).
    pub fn new(settings: Settings, run_dir: &Path) -> Result<Trainer> {
        fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let gpt = Gpt::init(settings.model.clone(), settings.seed)?;
        let opt =
            MuonAdamW::new(param_groups(&settings.model, &settings.optimizer()), gpt.params())?;
        // A fresh run starts a fresh metrics file.
        fs::write(run_dir.join("metrics.jsonl"), b"")?;
        Ok(Trainer { settings, gpt, opt, step: 0, run_dir: run_dir.to_path_buf() })
    }

    /// The newest checkpoint of `run_dir`, if any: (directory, step).
    pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, usize)>> {
        Ok(latest_checkpoint(run_dir)?)
    }

    /// Continue the run in `run_dir` from its newest checkpoint; restores `source` to where it
    /// was. `settings` must describe the same model (a different config is an error).
    pub fn resume(run_dir: &Path, source: &mut dyn BatchSource) -> Result<Trainer> {
        let (dir, _) = Trainer::latest(run_dir)?
            .with_context(|| format!("{} has no checkpoint to resume from", run_dir.display()))?;
        let state: CheckpointState = serde_json::from_slice(&fs::read(dir.join("state.json"))?)
            .with_context(|| format!("reading {}", dir.join("state.json").display()))?;
        let (gpt, meta) = load_model(&dir.join("model.safetensors"))?;
        if meta.config != state.settings.model {
            bail!("checkpoint {} holds a model of another config", dir.display());
        }
        let settings = state.settings;
        let mut opt =
            MuonAdamW::new(param_groups(&settings.model, &settings.optimizer()), gpt.params())?;
        load_optimizer(&dir.join("optimizer.safetensors"), &mut opt)?;
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
        write_atomic(&metrics, kept.as_bytes())?;
        Ok(Trainer { settings, gpt, opt, step: state.step, run_dir: run_dir.to_path_buf() })
    }

    /// Train on `device` (the optimizer state is keyed by name and stays put).
    pub fn with_device(mut self, device: Device) -> Result<Trainer> {
        self.gpt = self.gpt.to_device(device)?;
        Ok(self)
    }

    pub fn step(&self) -> usize {
        self.step
    }

    fn log(&self, line: serde_json::Value) -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.run_dir.join("metrics.jsonl"))?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    /// Write a checkpoint of the current step and point `latest.json` at it; keeps the previous
    /// one, deletes older ones.
    pub fn save(&self, source: &dyn BatchSource) -> Result<PathBuf> {
        let name = format!("step_{:06}", self.step);
        let dir = self.run_dir.join(&name);
        fs::create_dir_all(&dir)?;
        let meta = serde_json::json!({ "step": self.step });
        save_model(&dir.join("model.safetensors"), &self.gpt, &meta)?;
        save_optimizer(&dir.join("optimizer.safetensors"), &self.opt)?;
        let state = CheckpointState {
            step: self.step,
            source: source.state(),
            settings: self.settings.clone(),
        };
        write_atomic(&dir.join("state.json"), &serde_json::to_vec_pretty(&state)?)?;
        let previous = Trainer::latest(&self.run_dir)?;
        write_atomic(
            &self.run_dir.join("latest.json"),
            &serde_json::to_vec(&Latest { step: self.step, dir: name })?,
        )?;
        // Keep the previous checkpoint as a fallback, drop anything older.
        for entry in fs::read_dir(&self.run_dir)? {
            let p = entry?.path();
            let is_ckpt = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_"));
            let keep = p == dir || previous.as_ref().is_some_and(|(d, _)| *d == p);
            if is_ckpt && !keep {
                fs::remove_dir_all(&p).ok();
            }
        }
        Ok(dir)
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
        let schedule = s.schedule();
        let (b, t) = (s.device_batch_size, s.model.sequence_len);
        let flops_per_token = s.model.flops_per_token();
        let start = Instant::now();
        let first_step = self.step;
        let mut last_loss = f32::NAN;
        let mut val_bpb = None;
        while self.step < s.num_iterations {
            let it = self.step;
            if s.eval_every > 0
                && it.is_multiple_of(s.eval_every)
                && let Some(v) = validator.as_deref_mut()
            {
                let bpb = v.val_bpb(&self.gpt)?;
                self.log(serde_json::json!({ "step": it, "val_bpb": bpb }))?;
                val_bpb = Some(bpb);
            }
            if s.sample_every > 0
                && it > 0
                && it.is_multiple_of(s.sample_every)
                && let Some(hook) = sample.as_deref_mut()
            {
                for line in hook(&self.gpt)? {
                    eprintln!("[step {it}] {line}");
                }
            }
            let t0 = Instant::now();
            let mut grads = None;
            let mut loss_sum = 0.0f64;
            for _ in 0..s.grad_accum_steps {
                let batch = source.next_batch()?;
                if batch.inputs.len() != b * t || batch.targets.len() != b * t {
                    bail!("batch source gave {} tokens, expected {b}x{t}", batch.inputs.len());
                }
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
                    Some(acc) => femtochat_engine::Grads::accumulate(acc, g),
                }
            }
            let grads = grads.context("grad_accum_steps must be >= 1")?;
            let lrm = schedule.lr_multiplier(it) as f32;
            let momentum = schedule.muon_momentum(it) as f32;
            let wd = schedule.muon_weight_decay(it, s.weight_decay as f64) as f32;
            for g in self.opt.groups_mut() {
                g.lr = g.initial_lr * lrm;
                if let GroupKind::Muon { momentum: m, .. } = &mut g.kind {
                    *m = momentum;
                    g.weight_decay = wd;
                }
            }
            self.opt.step(self.gpt.params(), &grads)?;
            drop(grads);
            self.step += 1;
            last_loss = (loss_sum / s.grad_accum_steps as f64) as f32;
            let dt = t0.elapsed().as_secs_f64();
            let tok_per_s = s.tokens_per_step() as f64 / dt;
            self.log(serde_json::json!({
                "step": it, "loss": last_loss, "lr_mult": lrm, "muon_momentum": momentum,
                "muon_wd": wd, "tok_per_s": tok_per_s, "tflops": flops_per_token * tok_per_s / 1e12,
                "dt_ms": dt * 1e3,
            }))?;
            progress(it, last_loss, tok_per_s);
            if s.save_every > 0
                && self.step.is_multiple_of(s.save_every)
                && self.step < s.num_iterations
            {
                self.save(source)?;
            }
        }
        if let Some(v) = validator {
            let bpb = v.val_bpb(&self.gpt)?;
            self.log(serde_json::json!({ "step": self.step, "val_bpb": bpb }))?;
            val_bpb = Some(bpb);
        }
        self.save(source)?;
        let seconds = start.elapsed().as_secs_f64();
        let tokens = (self.step - first_step) * s.tokens_per_step();
        Ok(Summary {
            steps: self.step,
            final_loss: last_loss,
            val_bpb,
            tokens,
            seconds,
            tok_per_s: tokens as f64 / seconds.max(1e-9),
        })
    }
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
        let mut whole = Trainer::new(settings(), a.path()).unwrap();
        let summary = whole.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        assert_eq!(summary.steps, 6);

        // Crash during step 4 (its 9th micro-batch), after the step-3 checkpoint.
        let mut crashed = Trainer::new(settings(), b.path()).unwrap();
        let err = crashed.train(&mut source(Some(8)), None, None, |_, _, _| {}).unwrap_err();
        assert!(err.to_string().contains("simulated crash"));
        assert_eq!(Trainer::latest(b.path()).unwrap().unwrap().1, 3);
        let mut src = source(None);
        let mut resumed = Trainer::resume(b.path(), &mut src).unwrap();
        assert_eq!(resumed.step(), 3);
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

    /// Six optimizer steps on the GPU (lavapipe in CI) track the CPU run's losses.
    #[test]
    fn gpu_training_tracks_cpu_losses() {
        if let Err(e) = Device::Gpu.ensure_available() {
            assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
            return;
        }
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut cpu = Trainer::new(settings(), a.path()).unwrap();
        cpu.train(&mut source(None), None, None, |_, _, _| {}).unwrap();
        let mut gpu = Trainer::new(settings(), b.path()).unwrap().with_device(Device::Gpu).unwrap();
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

    #[test]
    fn non_finite_loss_is_reported_with_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut tr = Trainer::new(settings(), dir.path()).unwrap();
        tr.gpt.params().get("lm_head.weight").unwrap().with_data_mut(|d| d[0] = f32::NAN).unwrap();
        let err = tr.train(&mut source(None), None, None, |_, _, _| {}).unwrap_err().to_string();
        assert!(err.contains("step 0") && err.contains("no checkpoint"), "{err}");
    }
}
