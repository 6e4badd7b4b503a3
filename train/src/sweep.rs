//! `train sweep`: every combination of a grid of options of `train micro` or `train base`, each
//! run as a `train` subprocess in its own directory, summarised in one table.
//!
//! OUT/runs/<variant>/seed-<s>/ holds each run (its own metrics.jsonl, checkpoint, stderr.log)
//! and, once it finished, `sweep_row.json`: its row of the summary and the exact arguments it ran
//! with. A re-run skips every run whose row exists with the same arguments, so an interrupted
//! sweep resumes where it stopped; an unfinished run directory is cleared and run again.
//! OUT/summary.csv and summary.jsonl: one row per run; summary.md: the variants ranked by mean
//! validation bits per byte (mean ± std over seeds); loss.svg and val.svg: the curves per variant.
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use femtochat_model::checkpoint::write_atomic;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Options the sweep sets itself, so they cannot be grid axes.
const RESERVED: [&str; 4] = ["out", "seed", "steps", "num_iterations"];

#[derive(clap::Args)]
pub struct Args {
    /// Space-separated axes `key=v1,v2,...`; a key is any option of the swept subcommand with
    /// `-` or `_` (e.g. 'depth=1,2 tie_lm_head=true,false input_rmsnorm=true,false').
    #[arg(long)]
    grid: String,
    /// Steps of every run (`--steps` of micro, `--num-iterations` of base).
    #[arg(long)]
    steps: usize,
    /// Repeat every variant with seeds --seed, --seed + 1, ... (mean ± std in summary.md).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Runs at a time (give --threads too, so they do not fight over the cores).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Results directory (e.g. results/NAME).
    #[arg(long)]
    out: PathBuf,
    /// After `--`: the subcommand (micro or base) and its fixed arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// One run of the sweep.
struct Run {
    variant: Vec<(String, String)>,
    seed: u64,
    dir: PathBuf,
    /// Arguments after the binary name.
    argv: Vec<String>,
}

impl Run {
    fn variant_name(&self) -> String {
        variant_name(&self.variant)
    }
}

fn variant_name(v: &[(String, String)]) -> String {
    v.iter().map(|(k, x)| format!("{k}={x}")).collect::<Vec<_>>().join(",")
}

/// `key=v1,v2 key2=...` -> [(key, [v1, v2]), ...] in the given order.
fn parse_grid(grid: &str) -> Result<Vec<(String, Vec<String>)>> {
    let mut axes: Vec<(String, Vec<String>)> = Vec::new();
    for item in grid.split_whitespace() {
        let Some((key, values)) = item.split_once('=') else {
            bail!("--grid: `{item}` is not key=v1,v2,...");
        };
        let key = key.trim_start_matches("--").replace('-', "_");
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if key.is_empty() || !key.chars().all(ok) {
            bail!("--grid: `{key}` is not an option name");
        }
        if RESERVED.contains(&key.as_str()) {
            bail!("--grid: `{key}` is set by the sweep itself (--steps, --seed, --seeds, --out)");
        }
        if axes.iter().any(|(k, _)| *k == key) {
            bail!("--grid: `{key}` appears twice");
        }
        let values: Vec<String> = values.split(',').map(str::to_string).collect();
        if let Some(v) = values.iter().find(|v| v.is_empty() || v.contains(['/', '\\', '='])) {
            bail!("--grid: `{key}` has an empty or unusable value `{v}`");
        }
        axes.push((key, values));
    }
    if axes.is_empty() {
        bail!("--grid is empty");
    }
    Ok(axes)
}

/// Every combination, the first axis varying slowest.
fn combinations(axes: &[(String, Vec<String>)]) -> Vec<Vec<(String, String)>> {
    let mut out = vec![vec![]];
    for (k, values) in axes {
        out = out
            .into_iter()
            .flat_map(|prefix: Vec<(String, String)>| {
                values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push((k.clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    out
}

fn plan(a: &Args, threads: Option<usize>) -> Result<Vec<Run>> {
    let sub = a.command.first().map(String::as_str).unwrap_or_default();
    let steps_flag = match sub {
        "micro" => "--steps",
        "base" => "--num-iterations",
        _ => bail!("after --, give the subcommand to sweep: micro or base (got `{sub}`)"),
    };
    let axes = parse_grid(&a.grid)?;
    let mut runs = Vec::new();
    for variant in combinations(&axes) {
        for seed in a.seed..a.seed + a.seeds.max(1) {
            let dir = a.out.join("runs").join(variant_name(&variant)).join(format!("seed-{seed}"));
            let mut argv: Vec<String> =
                threads.map(|t| format!("--threads={t}")).into_iter().collect();
            argv.extend(a.command.iter().cloned());
            argv.extend(variant.iter().map(|(k, v)| format!("--{}={v}", k.replace('_', "-"))));
            argv.push(format!("{steps_flag}={}", a.steps));
            argv.push(format!("--seed={seed}"));
            argv.push(format!("--out={}", dir.display()));
            // Every run's arguments must parse before the first one starts.
            let full = std::iter::once("train".to_string()).chain(argv.iter().cloned());
            if let Err(e) = crate::Cli::try_parse_from(full) {
                bail!("variant {} does not parse:\n{e}", variant_name(&variant));
            }
            runs.push(Run { variant: variant.clone(), seed, dir, argv });
        }
    }
    Ok(runs)
}

fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c)
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("{c}-dirty")
        }
        Some(c) => c,
        None => "unknown".into(),
    }
}

/// Parameter count of a `train base` run: the tensor shapes in its latest checkpoint's header.
fn base_params(run_dir: &Path) -> Result<u64> {
    let latest: Value = serde_json::from_slice(&std::fs::read(run_dir.join("latest.json"))?)?;
    let dir = latest["dir"].as_str().context("latest.json has no `dir`")?;
    let bytes = std::fs::read(run_dir.join(dir).join("model.safetensors"))?;
    let n = u64::from_le_bytes(bytes.get(..8).context("short checkpoint")?.try_into()?) as usize;
    let header: Value = serde_json::from_slice(bytes.get(8..8 + n).context("short header")?)?;
    let shapes =
        header.as_object().context("bad header")?.iter().filter(|(k, _)| *k != "__metadata__");
    Ok(shapes
        .map(|(_, t)| {
            t["shape"].as_array().map_or(0, |s| s.iter().filter_map(Value::as_u64).product())
        })
        .sum())
}

/// Run one variant/seed and build its summary row.
fn execute(run: &Run, sub: &str, commit: &str) -> Result<Value> {
    if run.dir.exists() {
        std::fs::remove_dir_all(&run.dir)
            .with_context(|| format!("clearing the unfinished run {}", run.dir.display()))?;
    }
    std::fs::create_dir_all(&run.dir)?;
    let log = std::fs::File::create(run.dir.join("stderr.log"))?;
    let t0 = Instant::now();
    let exe = std::env::current_exe().context("locating the train binary")?;
    let out = Command::new(exe)
        .args(&run.argv)
        .stdin(Stdio::null())
        .stderr(log)
        .output()
        .context("starting a run")?;
    let seconds = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        let err = std::fs::read_to_string(run.dir.join("stderr.log")).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        bail!("{} failed ({}): {}", run.dir.display(), out.status, tail.join(" / "));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = match sub {
        "micro" => serde_json::from_slice(&std::fs::read(run.dir.join("summary.json"))?)?,
        _ => stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .context("the run printed no JSON summary")?,
    };
    let params = match summary["params"].as_u64() {
        Some(p) => p,
        None => base_params(&run.dir)?,
    };
    let mut row = serde_json::Map::new();
    row.insert("variant".into(), json!(run.variant_name()));
    for (k, v) in &run.variant {
        row.insert(k.clone(), json!(v));
    }
    row.insert("seed".into(), json!(run.seed));
    row.insert("params".into(), json!(params));
    for k in ["steps", "tokens", "tok_per_s", "final_loss", "val_loss", "val_bpb"] {
        row.insert(k.into(), summary.get(k).cloned().unwrap_or(Value::Null));
    }
    row.insert("seconds".into(), json!(seconds));
    row.insert("commit".into(), json!(commit));
    row.insert("run_dir".into(), json!(run.dir.display().to_string()));
    Ok(Value::Object(row))
}

pub fn main(a: Args, threads: Option<usize>) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be positive");
    }
    let runs = plan(&a, threads)?;
    let sub = a.command[0].clone();
    let commit = commit();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut rows: BTreeMap<usize, Value> = BTreeMap::new();
    let mut todo = VecDeque::new();
    for (i, run) in runs.iter().enumerate() {
        let done: Option<Value> = std::fs::read(run.dir.join("sweep_row.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|v: &Value| v["args"] == json!(run.argv));
        match done {
            Some(v) => {
                rows.insert(i, v["row"].clone());
            }
            None => todo.push_back(i),
        }
    }
    let skipped = rows.len();
    eprintln!(
        "sweep: {} runs ({} variants x {} seeds), {skipped} already finished, {} jobs at a time",
        runs.len(),
        runs.len() / a.seeds.max(1) as usize,
        a.seeds.max(1),
        a.jobs.max(1)
    );
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let queue = Mutex::new(todo);
    let results: Mutex<Vec<(usize, Result<Value>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..a.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some(i) = next else { break };
                    let run = &runs[i];
                    bar.set_message(run.variant_name());
                    let r = execute(run, &sub, &commit).and_then(|row| {
                        let rec = json!({ "args": run.argv, "row": row });
                        write_atomic(&run.dir.join("sweep_row.json"), rec.to_string().as_bytes())?;
                        Ok(row)
                    });
                    bar.inc(1);
                    results.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut failed = Vec::new();
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let ran = results.len();
    for (i, r) in results {
        match r {
            Ok(row) => {
                rows.insert(i, row);
            }
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    let axes: Vec<String> = parse_grid(&a.grid)?.into_iter().map(|(k, _)| k).collect();
    let rows: Vec<Value> = rows.into_values().collect();
    crate::sweep_report::write(&a.out, &axes, &rows)?;
    println!(
        "{}",
        json!({ "runs": runs.len(), "ran": ran, "skipped": skipped, "failed": failed.len(), "out": a.out })
    );
    if !failed.is_empty() {
        bail!("{} of {} runs failed:\n{}", failed.len(), runs.len(), failed.join("\n"));
    }
    eprintln!("sweep done: {}", a.out.join("summary.md").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_parsing_and_combinations() {
        let axes = parse_grid("depth=1,2 --tie-lm-head=true,false").unwrap();
        assert_eq!(axes[1].0, "tie_lm_head");
        let c = combinations(&axes);
        assert_eq!(c.len(), 4);
        assert_eq!(variant_name(&c[1]), "depth=1,tie_lm_head=false");
        assert!(parse_grid("depth").is_err());
        assert!(parse_grid("seed=1,2").is_err());
        assert!(parse_grid("depth=1 depth=2").is_err());
        assert!(parse_grid("data=a/b").is_err());
        assert!(parse_grid("").is_err());
    }
}
