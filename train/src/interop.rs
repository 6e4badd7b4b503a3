//! `train import-nanochat` and `train export-nanochat`: a PyTorch nanochat checkpoint to a
//! femtochat run directory and back, without Python (readers and writers in
//! femtochat_model::nanochat).
//!
//! An imported run is an ordinary run directory, written by the trainer's own `save`:
//! `tokenizer/`, `step_<step>/{model.safetensors, optimizer.safetensors, state.json}`,
//! `latest.json`, an empty `metrics.jsonl`, plus `imported.json` recording where it came from
//! (nanochat dir, source, tag, step, its meta json, what happened to the optimizer state).
//! `state.json` holds `step` (nanochat's), `source` (a data loader that has read nothing yet),
//! `settings` derived from nanochat's meta the way its base_train derives them (see
//! `settings_from_meta`) and a `run_id` of its own; there is no `run.json` (no femtochat data
//! was read), so `train base --resume --out RUN_DIR` continues training from it after a note.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use femtochat_engine::MuonAdamW;
use femtochat_model::checkpoint::{load_model, load_optimizer, write_atomic};
use femtochat_model::nanochat::{self, Source, optim};

use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::{GPTConfig, Gpt};
use serde_json::{Value, json};

use crate::loader::BestFitLoader;
use crate::recipe::{Recipe, RecipeInput};
use crate::rundir::{self, RunLock};
use crate::trainer::{LrSchedule, Settings, Trainer, read_state};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// nanochat's base directory ($NANOCHAT_BASE_DIR, default ~/.cache/nanochat), or one of its
    /// `<source>_checkpoints` directories, or one model tag directory in those.
    nanochat_dir: PathBuf,
    /// The femtochat run directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Which checkpoints: base, sft or rl (default: the first present of sft, rl, base).
    #[arg(long)]
    source: Option<Source>,
    /// Model tag, e.g. d20 (default: the largest, as nanochat's find_largest_model).
    #[arg(long)]
    tag: Option<String>,
    /// Step (default: the last).
    #[arg(long)]
    step: Option<u64>,
    /// Also import the optimizer state (optim_<step>_rank*.pt, all ranks) so training continues
    /// with its momentum; without it the optimizer starts fresh.
    #[arg(long)]
    optimizer: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// A femtochat run directory (its latest checkpoint is exported).
    run_dir: PathBuf,
    /// nanochat base directory to write into (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// Which nanochat checkpoints directory: base, sft or rl.
    #[arg(long, default_value = "base")]
    source: Source,
    /// Model tag (default: d<n_layer>).
    #[arg(long)]
    tag: Option<String>,
    /// Leave out the optimizer state (optim_<step>_rank0.pt).
    #[arg(long)]
    no_optimizer: bool,
}

/// Training settings for continuing an imported run, derived from nanochat's meta
/// (`device_batch_size`, `total_batch_size`, `user_config`) by base_train's recipe (recipe.rs):
/// num_iterations (explicit, else from target FLOPs, else target_param_data_ratio x scaling
/// params / batch), learning rates (the optimizer groups' `initial_lr` when imported, which are
/// what the run trained with; else user_config's scaled by sqrt(batch / 2^19)), Muon weight decay
/// (base_train's correction of user_config's; 0 for sft/rl, as chat_sft). nanochat's defaults
/// stand in for anything missing. The schedule is base_train's.
fn settings_from_meta(
    config: &GPTConfig,
    meta: &Value,
    source: Source,
    step: u64,
    groups: Option<&[optim::Hyper]>,
) -> Result<Settings> {
    let uc = &meta["user_config"];
    let positive = |v: &Value| v.as_f64().filter(|x| *x > 0.0);
    let num = |k: &str, default: f64| positive(&uc[k]).unwrap_or(default);
    let dbs =
        positive(&meta["device_batch_size"]).unwrap_or(num("device_batch_size", 32.0)) as usize;
    let micro = dbs * config.sequence_len;
    let total = positive(&meta["total_batch_size"]).or(positive(&uc["total_batch_size"]));
    let input = RecipeInput {
        model: config.clone(),
        aspect_ratio: num("aspect_ratio", 64.0) as usize,
        head_dim: num("head_dim", 128.0) as usize,
        target_param_data_ratio: num("target_param_data_ratio", 12.0),
        total_batch_size: total.map(|t| t as usize),
        num_iterations: positive(&uc["num_iterations"]).map(|n| n as usize),
        target_flops: positive(&uc["target_flops"]),
        embedding_lr: num("embedding_lr", 0.3) as f32,
        unembedding_lr: num("unembedding_lr", 0.008) as f32,
        matrix_lr: num("matrix_lr", 0.02) as f32,
        scalar_lr: num("scalar_lr", 0.5) as f32,
        weight_decay: uc["weight_decay"].as_f64().unwrap_or(0.28) as f32,
    };
    let r = Recipe::derive(&input)?;
    // One process does the work of nanochat's ranks: the same tokens per step.
    let grad_accum = match r.total_batch_size {
        t if t >= micro && t.is_multiple_of(micro) => t / micro,
        _ => 1,
    };
    let num_iterations = match source {
        Source::Base => r.num_iterations,
        _ => input.num_iterations.unwrap_or(step as usize),
    }
    .max(step as usize)
    .max(1);
    // AdamW learning rates were scaled by (n_embd / 768)^-0.5 in setup_optimizer.
    let dmodel_scale = (config.n_embd as f64 / 768.0).powf(-0.5);
    let group = |first: &str, kind: optim::Kind, scale: f64| -> Option<f32> {
        let g = groups?.iter().find(|g| {
            g.kind == kind && g.params.first().is_some_and(|p| p == first || first.is_empty())
        })?;
        Some((g.initial_lr / scale) as f32)
    };
    let adam = |first: &str, scale: f64| group(first, optim::Kind::AdamW, scale);
    let every = |k: &str, default: i64| uc[k].as_i64().unwrap_or(default).max(0) as usize;
    Ok(Settings {
        model: config.clone(),
        device_batch_size: dbs,
        grad_accum_steps: grad_accum,
        num_iterations,
        warmup_steps: uc["warmup_steps"].as_u64().unwrap_or(40) as usize,
        warmdown_ratio: uc["warmdown_ratio"].as_f64().unwrap_or(0.65),
        final_lr_frac: uc["final_lr_frac"].as_f64().unwrap_or(0.05),
        unembedding_lr: adam("lm_head.weight", dmodel_scale).unwrap_or(r.unembedding_lr),
        embedding_lr: adam("transformer.wte.weight", dmodel_scale).unwrap_or(r.embedding_lr),
        matrix_lr: group("", optim::Kind::Muon, 1.0).unwrap_or(r.matrix_lr),
        scalar_lr: adam("x0_lambdas", 1.0).unwrap_or(r.scalar_lr),
        weight_decay: if source == Source::Base { r.weight_decay } else { 0.0 },
        lr_schedule: LrSchedule::Base,
        lr_scale: 1.0,
        eval_every: every("eval_every", 250),
        save_every: every("save_every", 0),
        sample_every: every("sample_every", 2000),
        seed: 42,
    })
}

/// What an import wrote.
pub struct Imported {
    pub run_dir: PathBuf,
    pub located: nanochat::Located,
    pub optimizer: String,
}

/// Import a nanochat checkpoint into a new run directory.
pub fn import(
    nanochat_dir: &Path,
    out: &Path,
    source: Option<Source>,
    tag: Option<&str>,
    step: Option<u64>,
    with_optimizer: bool,
) -> Result<Imported> {
    let loc = nanochat::locate(nanochat_dir, source, tag, step)?;
    rundir::prepare_new(out, false)?;
    let _lock = RunLock::acquire(out)?;
    eprintln!(
        "importing nanochat {} checkpoint {} step {} from {}",
        loc.source.name(),
        loc.tag,
        loc.step,
        loc.dir.display()
    );
    let tok = nanochat::load_tokenizer(&loc.root.join("tokenizer")).with_context(|| {
        format!("nanochat tokenizer in {}", loc.root.join("tokenizer").display())
    })?;
    let (gpt, meta) = nanochat::load_model(&loc)?;
    if tok.vocab_size() != gpt.config().vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model expects {}",
            tok.vocab_size(),
            gpt.config().vocab_size
        );
    }
    let paths = loc.optimizer_paths();
    let imported_opt = match (with_optimizer, paths.is_empty()) {
        (true, false) => Some(optim::load(&paths, gpt.config())?),
        (true, true) => {
            bail!("--optimizer: no optim_{:06}_rank0.pt in {}", loc.step, loc.dir.display())
        }
        (false, _) => None,
    };
    let optimizer = match &imported_opt {
        Some(o) => format!("imported from {} rank file(s), step {}", o.ranks, o.step),
        None if paths.is_empty() => "fresh (no optimizer files)".into(),
        None => "fresh (not asked for; --optimizer imports it)".into(),
    };
    let groups = imported_opt.as_ref().map(|o| o.groups.as_slice());
    // A checkpoint exported by femtochat carries its exact settings.
    let settings = match serde_json::from_value::<Settings>(meta["femtochat"]["settings"].clone()) {
        Ok(s) if s.model == *gpt.config() => s,
        _ => settings_from_meta(gpt.config(), &meta, loc.source, loc.step, groups)?,
    };
    let mut opt = MuonAdamW::new(settings.param_groups(), gpt.params())?;
    if let Some(o) = &imported_opt {
        opt.load_state_dict(o.step, &o.buffers)?;
    }
    let run_id = format!("nanochat-{}", rundir::new_run_id());
    let mut trainer = Trainer::start(settings, gpt, opt, out, &run_id)?.at_step(loc.step as usize);
    tok.save(&out.join("tokenizer"))?;
    // The data loader has read nothing: a resumed run starts at the first document.
    trainer.save(BestFitLoader::initial_state())?;
    let root = std::fs::canonicalize(&loc.root).unwrap_or_else(|_| loc.root.clone());
    let record = json!({
        "from": "nanochat",
        "nanochat_dir": root,
        "source": loc.source.name(),
        "tag": loc.tag,
        "step": loc.step,
        "optimizer": optimizer,
        "meta": meta,
    });
    write_atomic(&out.join("imported.json"), &serde_json::to_vec_pretty(&record)?)?;
    Ok(Imported { run_dir: out.to_path_buf(), located: loc, optimizer })
}

pub fn import_main(a: ImportArgs) -> Result<()> {
    let done = import(&a.nanochat_dir, &a.out, a.source, a.tag.as_deref(), a.step, a.optimizer)?;
    let l = &done.located;
    eprintln!("wrote {} (optimizer: {})", done.run_dir.display(), done.optimizer);
    let line = json!({
        "run_dir": done.run_dir, "source": l.source.name(), "tag": l.tag, "step": l.step,
        "optimizer": done.optimizer,
    });
    println!("{line}");
    Ok(())
}

/// The latest checkpoint of a run: model, tokenizer, settings, optimizer (step, buffers).
type RunParts = (Gpt, Tokenizer, Settings, (u64, BTreeMap<String, Vec<f32>>), usize);

fn read_run(run_dir: &Path) -> Result<RunParts> {
    let (dir, step) = Trainer::latest(run_dir)?.with_context(|| {
        format!("{} has no latest.json: not a run directory", run_dir.display())
    })?;
    let (gpt, _) = load_model(&dir.join("model.safetensors"))?;
    let tok = Tokenizer::load(&run_dir.join("tokenizer"))?;
    let settings = read_state(&dir)?.settings;
    let mut opt = MuonAdamW::new(settings.param_groups(), gpt.params())?;
    load_optimizer(&dir.join("optimizer.safetensors"), &mut opt)?;
    Ok((gpt, tok, settings, opt.state_dict()?, step))
}

/// The last validation bits per byte in a run's metrics, if any.
fn last_val_bpb(run_dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).ok()?;
    text.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()?["val_bpb"].as_f64())
}

/// Export a run's latest checkpoint into nanochat's layout; returns the checkpoint directory.
pub fn export(
    run_dir: &Path,
    out: &Path,
    source: Source,
    tag: Option<&str>,
    with_optimizer: bool,
) -> Result<PathBuf> {
    let (gpt, tok, settings, (opt_step, bufs), step) = read_run(run_dir)?;
    let c = gpt.config().clone();
    let tok_dir = out.join("tokenizer");
    if tok_dir.join("tokenizer.pkl").exists() {
        // Other checkpoints in this directory use this tokenizer: never replace it.
        let existing = nanochat::load_tokenizer(&tok_dir)?;
        if existing.parts() != tok.parts() || existing.pattern() != tok.pattern() {
            bail!(
                "{} holds a different tokenizer; export into another directory",
                tok_dir.display()
            );
        }
    } else {
        nanochat::save_tokenizer(&tok, &tok_dir)?;
    }
    let tag = tag.map_or_else(|| format!("d{}", c.n_layer), str::to_string);
    let dir = out.join(source.dir_name()).join(&tag);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    nanochat::save_state_dict(&dir.join(format!("model_{step:06}.pt")), &gpt)?;
    if with_optimizer {
        let groups = settings.param_groups();
        optim::save(&dir.join(format!("optim_{step:06}_rank0.pt")), &c, opt_step, &bufs, &groups)?;
    }
    let total = settings.tokens_per_step();
    let meta = json!({
        "step": step,
        "val_bpb": last_val_bpb(run_dir),
        "model_config": c,
        "user_config": {
            "depth": c.n_layer, "max_seq_len": c.sequence_len, "window_pattern": c.window_pattern,
            "num_iterations": settings.num_iterations, "device_batch_size": settings.device_batch_size,
            "total_batch_size": total, "embedding_lr": settings.embedding_lr,
            "unembedding_lr": settings.unembedding_lr, "matrix_lr": settings.matrix_lr,
            "scalar_lr": settings.scalar_lr, "weight_decay": settings.weight_decay,
            "warmup_steps": settings.warmup_steps, "warmdown_ratio": settings.warmdown_ratio,
            "final_lr_frac": settings.final_lr_frac, "exported_by": "femtochat",
        },
        "device_batch_size": settings.device_batch_size,
        "max_seq_len": c.sequence_len,
        "total_batch_size": total,
        "femtochat": { "settings": settings },
    });
    write_atomic(&dir.join(format!("meta_{step:06}.json")), &serde_json::to_vec_pretty(&meta)?)?;
    Ok(dir)
}

pub fn export_main(a: ExportArgs) -> Result<()> {
    let dir = export(&a.run_dir, &a.out, a.source, a.tag.as_deref(), !a.no_optimizer)?;
    eprintln!("wrote {}", dir.display());
    println!("{}", json!({ "checkpoint_dir": dir, "nanochat_dir": a.out }));
    Ok(())
}

#[cfg(test)]
#[path = "interop_tests.rs"]
mod tests;
