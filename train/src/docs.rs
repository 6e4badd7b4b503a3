//! Documents from files, streamed (never loaded whole): plain text (`.txt`: documents are
//! separated by blank lines), JSONL with a `text` field (`.jsonl`, `.jsonl.gz`), parquet with a
//! `text` column (`.parquet`: FineWeb-Edu / ClimbMix shards; only that column is read, row group
//! by row group), or directories of those (sorted by name). Each document carries its global index in the stream, so loaders
//! can record exactly where they are.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A record that cannot be a document (invalid JSON, no `text` string); the error names the
/// file and line. Loaders may skip these (`--skip-bad`); every other error is fatal.
#[derive(Debug)]
pub struct BadRecord(pub String);

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadRecord {}

fn bad(msg: String) -> anyhow::Error {
    anyhow::Error::new(BadRecord(msg))
}

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
                bail!("{} holds no .txt, .jsonl, .jsonl.gz or .parquet files", p.display());
            }
            files.extend(entries);
        } else if !p.exists() {
            bail!("{} does not exist", p.display());
        } else if format_of(p).is_none() {
            bail!("{}: unknown format (expected .txt, .jsonl, .jsonl.gz or .parquet)", p.display());
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
    Parquet,
}

fn format_of(p: &Path) -> Option<Format> {
    let name = p.file_name()?.to_string_lossy().to_string();
    if name.ends_with(".txt") || name.ends_with(".txt.gz") {
        Some(Format::Text)
    } else if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
        Some(Format::Jsonl)
    } else if name.ends_with(".parquet") {
        Some(Format::Parquet)
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
            // `open` refuses parquet files.
            Format::Parquet => None,
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
                    Err(e) => return Some(Err(bad(format!("{}: invalid JSON: {e}", at())))),
                };
                return Some(match v.get("text").and_then(|t| t.as_str()) {
                    Some(t) => Ok(t.to_string()),
                    None => Err(bad(format!("{}: no string field `text`", at()))),
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
        let opened: Result<Box<dyn Iterator<Item = Result<String>> + Send>> = match format_of(&f) {
            Some(Format::Parquet) => parquet_docs(&f).map(|d| Box::new(d) as _),
            _ => FileDocs::open(&f).map(|d| Box::new(d) as _),
        };
        opened.unwrap_or_else(|e| Box::new(std::iter::once(Err(e))))
    })
}

/// The `text` column of a parquet file, row by row.
fn parquet_docs(path: &Path) -> Result<impl Iterator<Item = Result<String>> + Send + use<>> {
    use parquet::file::reader::FileReader;
    use parquet::file::serialized_reader::SerializedFileReader;
    use parquet::record::RowAccessor;
    use parquet::schema::types::Type;

    let at = path.display().to_string();
    let file = File::open(path).with_context(|| format!("opening {at}"))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{at}: not a parquet file"))?;
    let root = reader.metadata().file_metadata().schema();
    let field = root
        .get_fields()
        .iter()
        .find(|f| f.name() == "text")
        .cloned()
        .with_context(|| format!("{at}: no `text` column"))?;
    let projection = Type::group_type_builder(root.name()).with_fields(vec![field]).build()?;
    let rows = reader
        .into_iter()
        .project(Some(projection))
        .with_context(|| format!("{at}: reading `text`"))?;
    let mut n = 0usize;
    Ok(rows.map(move |row| {
        n += 1;
        let row = row.with_context(|| format!("{at}: reading row {n}"))?;
        match row.get_string(0) {
            Ok(t) => Ok(t.clone()),
            Err(_) => Err(bad(format!("{at}: row {n}: `text` is not a string"))),
        }
    }))
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

    /// Parquet shards (snappy with two row groups, zstd) made by pyarrow.
    #[test]
    fn parquet_text_column() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for f in ["docs_snappy.parquet", "docs_zstd.parquet"] {
            let docs: Vec<String> = documents(&[dir.join(f)]).collect::<Result<_>>().unwrap();
            assert_eq!(docs, ["First document.", "Second one, with ünïcode.", "Third."], "{f}");
        }
        let err = documents(&[dir.join("no_text.parquet")]).next().unwrap().unwrap_err();
        assert!(err.to_string().contains("no `text` column"), "{err}");
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("fake.parquet");
        std::fs::write(&fake, b"not parquet at all").unwrap();
        let err = documents(&[fake]).next().unwrap().unwrap_err();
        assert!(err.to_string().contains("not a parquet file"), "{err}");
    }
}
