//! Documents from files, streamed (never loaded whole): plain text (`.txt`: documents are
//! separated by blank lines), JSONL with a `text` field (`.jsonl`, `.jsonl.gz`), or directories
//! of those (sorted by name). Each document carries its global index in the stream, so loaders
//! can record exactly where they are.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Expand directories into their data files, sorted; check that every file has a known format.
pub fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| format_of(f).is_some())
                .collect();
            entries.sort();
            if entries.is_empty() {
                bail!("{} holds no .txt, .jsonl or .jsonl.gz files", p.display());
            }
            files.extend(entries);
        } else if !p.exists() {
            bail!("{} does not exist", p.display());
        } else if format_of(p).is_none() {
            bail!("{}: unknown format (expected .txt, .jsonl or .jsonl.gz)", p.display());
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        bail!("no input files");
    }
    Ok(files)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Jsonl,
}

fn format_of(p: &Path) -> Option<Format> {
    let name = p.file_name()?.to_string_lossy().to_string();
    if name.ends_with(".txt") || name.ends_with(".txt.gz") {
        Some(Format::Text)
    } else if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
        Some(Format::Jsonl)
    } else {
        None
    }
}

fn open(p: &Path) -> Result<Box<dyn BufRead + Send>> {
    let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    Ok(if p.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    })
}

/// The documents of one file, in order.
pub struct FileDocs {
    path: PathBuf,
    lines: std::io::Lines<Box<dyn BufRead + Send>>,
    format: Format,
    line_no: usize,
}

impl FileDocs {
    pub fn open(path: &Path) -> Result<FileDocs> {
        let format =
            format_of(path).with_context(|| format!("{}: unknown format", path.display()))?;
        Ok(FileDocs { path: path.to_path_buf(), lines: open(path)?.lines(), format, line_no: 0 })
    }
}

impl Iterator for FileDocs {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        match self.format {
            Format::Jsonl => loop {
                let line = match self.lines.next()? {
                    Ok(l) => l,
                    Err(e) => {
                        return Some(
                            Err(e).with_context(|| format!("reading {}", self.path.display())),
                        );
                    }
                };
                self.line_no += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let at = || format!("{}:{}", self.path.display(), self.line_no);
                let v: serde_json::Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(e) => return Some(Err(anyhow::anyhow!("{}: invalid JSON: {e}", at()))),
                };
                return Some(match v.get("text").and_then(|t| t.as_str()) {
                    Some(t) => Ok(t.to_string()),
                    None => Err(anyhow::anyhow!("{}: no string field `text`", at())),
                });
            },
            Format::Text => {
                // A document is a run of non-blank lines.
                let mut doc = String::new();
                loop {
                    match self.lines.next() {
                        None => return (!doc.is_empty()).then_some(Ok(doc)),
                        Some(Err(e)) => {
                            return Some(
                                Err(e).with_context(|| format!("reading {}", self.path.display())),
                            );
                        }
                        Some(Ok(line)) => {
                            self.line_no += 1;
                            if line.trim().is_empty() {
                                if !doc.is_empty() {
                                    return Some(Ok(doc));
                                }
                            } else {
                                doc.push_str(&line);
                                doc.push('\n');
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Documents of several files in order, once.
pub fn documents(files: &[PathBuf]) -> impl Iterator<Item = Result<String>> + Send + use<> {
    let files = files.to_vec();
    files.into_iter().flat_map(|f| -> Box<dyn Iterator<Item = Result<String>> + Send> {
        match FileDocs::open(&f) {
            Ok(d) => Box::new(d),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, "First para\nline two\n\n\nSecond\n").unwrap();
        let jl = dir.path().join("b.jsonl");
        std::fs::write(&jl, "{\"text\": \"x\"}\n\n{\"text\": \"y\"}\n").unwrap();
        let docs: Vec<String> = documents(&expand(&[dir.path().to_path_buf()]).unwrap())
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(docs, ["First para\nline two\n", "Second\n", "x", "y"]);

        std::fs::write(&jl, "{\"body\": \"x\"}\n").unwrap();
        let err = documents(std::slice::from_ref(&jl)).next().unwrap().unwrap_err().to_string();
        assert!(err.contains("b.jsonl:1") && err.contains("`text`"), "{err}");
        assert!(expand(&[dir.path().join("missing.txt")]).is_err());
        assert!(expand(&[dir.path().join("x.csv")]).is_err());
    }
}
