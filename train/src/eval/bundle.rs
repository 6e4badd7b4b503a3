//! A CORE eval bundle in nanochat's `eval_bundle/` layout: `core.yaml` (the task list),
//! `eval_meta_data.csv` (random baselines) and `eval_data/<uri>` (task rows, `.jsonl` or
//! `.jsonl.gz`). The YAML reader covers what the bundle uses: a list of maps of scalars, quoted
//! strings and one-element flow lists (`num_fewshot: [10]`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// How a CORE task is posed and scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskType {
    /// Same context, different continuations (the choices): lowest mean loss wins.
    MultipleChoice,
    /// Different contexts, same continuation: lowest mean loss of the continuation wins.
    Schema,
    /// The greedy continuation must equal the reference exactly.
    LanguageModeling,
}

#[derive(Clone, Debug)]
pub struct CoreTask {
    pub label: String,
    pub dataset_uri: String,
    pub num_fewshot: usize,
    pub task_type: TaskType,
    pub continuation_delimiter: String,
    /// Random-guess accuracy in percent.
    pub random_baseline: f64,
}

#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub tasks: Vec<CoreTask>,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Bundle> {
        let yaml_path = dir.join("core.yaml");
        let yaml = std::fs::read_to_string(&yaml_path)
            .with_context(|| format!("reading {} (not an eval bundle?)", yaml_path.display()))?;
        let csv_path = dir.join("eval_meta_data.csv");
        let baselines = read_baselines(&csv_path)?;
        let mut tasks = Vec::new();
        for (line, map) in parse_task_list(&yaml, &yaml_path)? {
            let get = |k: &str| {
                map.get(k)
                    .with_context(|| format!("{}:{line}: task without `{k}`", yaml_path.display()))
            };
            let label = get("label")?.clone();
            let task_type = match get("icl_task_type")?.as_str() {
                "multiple_choice" => TaskType::MultipleChoice,
                "schema" => TaskType::Schema,
                "language_modeling" => TaskType::LanguageModeling,
                other => {
                    bail!("{}:{line}: unsupported icl_task_type {other:?}", yaml_path.display())
                }
            };
            let shots = get("num_fewshot")?;
            let num_fewshot = shots
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .next()
                .and_then(|s| s.trim().parse().ok())
                .with_context(|| {
                    format!("{}:{line}: bad num_fewshot {shots:?}", yaml_path.display())
                })?;
            let random_baseline = *baselines.get(&label).with_context(|| {
                format!("{}: no random baseline for task {label}", csv_path.display())
            })?;
            tasks.push(CoreTask {
                label,
                dataset_uri: get("dataset_uri")?.clone(),
                num_fewshot,
                task_type,
                continuation_delimiter: map
                    .get("continuation_delimiter")
                    .cloned()
                    .unwrap_or_else(|| " ".into()),
                random_baseline,
            });
        }
        if tasks.is_empty() {
            bail!("{}: no icl_tasks", yaml_path.display());
        }
        Ok(Bundle { dir: dir.to_path_buf(), tasks })
    }

    /// The rows file of a task: `eval_data/<uri>`, or the same with `.gz`; None when absent.
    pub fn data_file(&self, task: &CoreTask) -> Option<PathBuf> {
        let p = self.dir.join("eval_data").join(&task.dataset_uri);
        let gz = PathBuf::from(format!("{}.gz", p.display()));
        [p, gz].into_iter().find(|f| f.is_file())
    }
}

/// `Eval Task` -> `Random baseline` from the metadata CSV.
fn read_baselines(path: &Path) -> Result<HashMap<String, f64>> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let headers = r.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no column {name:?}", path.display()))
    };
    let (task_col, base_col) = (col("Eval Task")?, col("Random baseline")?);
    let mut out = HashMap::new();
    for (n, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: record {}", path.display(), n + 1))?;
        let (Some(task), Some(base)) = (rec.get(task_col), rec.get(base_col)) else { continue };
        if let Ok(b) = base.trim().parse::<f64>() {
            out.insert(task.to_string(), b);
        }
    }
    Ok(out)
}

/// The `icl_tasks:` list: one map per `-` item, with the line it starts on.
fn parse_task_list(yaml: &str, path: &Path) -> Result<Vec<(usize, HashMap<String, String>)>> {
    let mut items: Vec<(usize, HashMap<String, String>)> = Vec::new();
    let mut in_list = false;
    for (n, raw) in yaml.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or(raw).trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_list = line.trim() == "icl_tasks:";
            continue;
        }
        if !in_list {
            continue;
        }
        let mut body = line.trim_start();
        if let Some(rest) = body.strip_prefix('-') {
            items.push((n + 1, HashMap::new()));
            body = rest.trim_start();
            if body.is_empty() {
                continue;
            }
        }
        let (key, value) = body
            .split_once(':')
            .with_context(|| format!("{}:{}: expected `key: value`", path.display(), n + 1))?;
        let item = items
            .last_mut()
            .with_context(|| format!("{}:{}: a key before the first `-`", path.display(), n + 1))?;
        item.1.insert(key.trim().to_string(), unquote(value.trim(), path, n + 1)?);
    }
    Ok(items)
}

/// A YAML scalar: double-quoted (with escapes), single-quoted, or plain.
fn unquote(v: &str, path: &Path, line: usize) -> Result<String> {
    if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            out.push(match chars.next() {
                Some('n') => '\n',
                Some('t') => '\t',
                Some('r') => '\r',
                Some('0') => '\0',
                Some(c @ ('"' | '\\' | '/' | ' ')) => c,
                other => bail!("{}:{line}: unsupported escape \\{other:?}", path.display()),
            });
        }
        return Ok(out);
    }
    if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return Ok(inner.replace("''", "'"));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_core_yaml_parses() {
        let b = Bundle::load(&crate::tasks::bundled("data/eval/core").unwrap()).unwrap();
        assert_eq!(b.tasks.len(), 22);
        let jeopardy = b.tasks.iter().find(|t| t.label == "jeopardy").unwrap();
        assert_eq!(jeopardy.continuation_delimiter, "\nAnswer: ");
        assert_eq!(jeopardy.num_fewshot, 10);
        assert_eq!(jeopardy.task_type, TaskType::LanguageModeling);
        assert_eq!(jeopardy.random_baseline, 0.0);
        let hs = b.tasks.iter().find(|t| t.label == "hellaswag_zeroshot").unwrap();
        assert_eq!(
            (hs.num_fewshot, hs.random_baseline, hs.continuation_delimiter.as_str()),
            (0, 25.0, " ")
        );
        let present = b.tasks.iter().filter(|t| b.data_file(t).is_some()).count();
        assert_eq!(present, 20, "squad and coqa are not bundled");
    }
}
