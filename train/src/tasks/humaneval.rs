//! HumanEval: write a Python function from its signature and docstring. A completion passes when
//! the program (the prompt's imports, the completion's code, the tests, `check(entry_point)`)
//! runs to the end in the sandbox (`eval::execution`).
use std::path::Path;

use anyhow::Result;
use femtochat_model::tokenizer::{Content, Conversation};
use serde::Deserialize;

use super::{Task, check_index, nanochat_order, read_jsonl, user_assistant};
use crate::eval::execution::{Limits, execute};

#[derive(Clone, Debug, Deserialize)]
struct Row {
    prompt: String,
    canonical_solution: String,
    test: String,
    entry_point: String,
}

pub struct HumanEval {
    rows: Vec<Row>,
    limits: Limits,
}

impl HumanEval {
    pub fn load(path: &Path) -> Result<HumanEval> {
        Ok(HumanEval { rows: nanochat_order(read_jsonl(path)?), limits: Limits::default() })
    }

    /// The sandbox limits each program runs under.
    pub fn with_limits(mut self, limits: Limits) -> HumanEval {
        self.limits = limits;
        self
    }

    /// The program run to check `completion` on example `i`.
    pub fn program(&self, i: usize, completion: &str) -> Result<String> {
        check_index(self, i)?;
        let r = &self.rows[i];
        Ok(format!(
            "{}\n\n{}\n\n{}\ncheck({})",
            extract_imports(&r.prompt),
            extract_program(completion),
            r.test,
            r.entry_point
        ))
    }
}

/// The import lines at the top of a prompt (blank and comment lines skipped, stop at the first
/// other line), stripped.
pub fn extract_imports(prompt: &str) -> String {
    let mut out = Vec::new();
    for line in prompt.split('\n') {
        let s = py_strip(line);
        if s.starts_with("import ") || s.starts_with("from ") {
            out.push(s);
        } else if !s.is_empty() && !s.starts_with('#') {
            break;
        }
    }
    out.join("\n")
}

/// The first fenced code block of a completion (```python or ```), else the whole completion;
/// stripped either way.
pub fn extract_program(completion: &str) -> String {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r"(?s)```(?:python)?\s*\n(.*?)\n```").expect("a valid regex")
    });
    match re.captures(completion) {
        Some(c) => py_strip(&c[1]).to_string(),
        None => py_strip(completion).to_string(),
    }
}

/// Python's `str.strip()`: Unicode whitespace plus the separators U+001C..U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

impl Task for HumanEval {
    fn name(&self) -> &str {
        "humaneval"
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        check_index(self, i)?;
        let r = &self.rows[i];
        let solution = format!("{}\n{}", r.prompt, r.canonical_solution);
        Ok(user_assistant(r.prompt.clone(), Content::Text(solution)))
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        let program = self.program(i, completion)?;
        Ok(execute(&program, &self.limits)?.success)
    }
}
