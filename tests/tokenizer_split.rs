//! The hand-written splitter on real text: it must cut every committed document exactly where
//! fancy-regex's `find_iter` with SPLIT_PATTERN cuts it (the proptests in
//! model/src/tokenizer/split.rs cover arbitrary strings). And a tokenizer with any other pattern
//! still splits with fancy-regex.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use fancy_regex::Regex;
use femtochat::model::tokenizer::{
    SPECIAL_TOKENS, SPLIT_PATTERN, Splitter, Tokenizer, parse_tiktoken,
};
use rayon::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every string value in every JSON line of `path` (texts, chat messages, tool outputs).
fn strings(path: &Path) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let f = std::fs::File::open(path).unwrap();
    let lines: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    let mut out = Vec::new();
    for line in lines.lines() {
        walk(&serde_json::from_str(&line.unwrap()).unwrap(), &mut out);
    }
    out
}

#[test]
fn splitter_equals_regex_on_every_bundled_document() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["tests/fixtures/tokenizer", "data"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 9, "expected the fixture and corpus files, found {files:?}");
    let regex = Regex::new(SPLIT_PATTERN).unwrap();
    let splitter = Splitter::new().unwrap();
    let mut total = (0usize, 0usize);
    for file in &files {
        let docs = strings(file);
        let bytes: usize = docs
            .par_iter()
            .map(|doc| {
                let mut want = regex.find_iter(doc).map(|m| m.unwrap().as_str());
                let mut got = splitter.split(doc);
                let mut at = 0usize;
                loop {
                    match (got.next(), want.next()) {
                        (None, None) => break,
                        (g, w) => {
                            assert_eq!(
                                g,
                                w,
                                "{}: first difference at byte {at} of a document, before {:?}",
                                file.display(),
                                doc.get(at..)
                                    .unwrap_or_default()
                                    .chars()
                                    .take(40)
                                    .collect::<String>()
                            );
                            at += g.map_or(0, str::len);
                        }
                    }
                }
                doc.len()
            })
            .sum();
        total.0 += docs.len();
        total.1 += bytes;
    }
    // The bundled corpora alone are several MB; make sure they were really read.
    assert!(total.1 > 10_000_000, "only {} documents, {} bytes", total.0, total.1);
}

/// A pattern that is not SPLIT_PATTERN's text goes through fancy-regex: the same language
/// written differently encodes identically, and a different language encodes differently.
#[test]
fn custom_patterns_still_split_with_fancy_regex() {
    let file = std::fs::read_to_string(root().join("tests/fixtures/tokenizer/ranks_2048.tiktoken"))
        .unwrap();
    let ranks = || parse_tiktoken(&file).unwrap();
    let builtin = Tokenizer::new(ranks(), &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap();
    let same = Tokenizer::new(ranks(), &SPECIAL_TOKENS, &format!("(?:{SPLIT_PATTERN})")).unwrap();
    // One chunk per char: every ASCII char can only become its own byte token.
    let chars = Tokenizer::new(ranks(), &SPECIAL_TOKENS, r"(?s:.)").unwrap();
    let texts = strings(&root().join("tests/fixtures/tokenizer/encode_2048.jsonl"));
    for text in &texts {
        assert_eq!(same.encode(text), builtin.encode(text), "{text:?}");
        assert_eq!(chars.decode(&chars.encode(text)).unwrap(), *text);
    }
    let ascii = "Hello world, it's 2024!\n";
    assert_eq!(chars.encode(ascii), ascii.bytes().map(u32::from).collect::<Vec<_>>());
    assert_ne!(builtin.encode(ascii), chars.encode(ascii));

    // Saved and loaded, the custom pattern is kept (and so is its splitting).
    let dir = tempfile::tempdir().unwrap();
    chars.save(dir.path()).unwrap();
    let loaded = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(loaded.pattern(), r"(?s:.)");
    assert_eq!(loaded.encode(ascii), chars.encode(ascii));
}

/// Throughput of the splitter alone against fancy-regex alone, one thread, on the bundled
/// corpora (not a correctness test; run with `cargo test --release --test tokenizer_split --
/// --ignored --nocapture`).
#[test]
#[ignore]
fn splitter_throughput() {
    let docs: Vec<String> = ["data/gutenberg.jsonl.gz", "data/shakespeare.jsonl.gz"]
        .iter()
        .flat_map(|f| strings(&root().join(f)))
        .collect();
    let bytes: usize = docs.iter().map(String::len).sum();
    let regex = Regex::new(SPLIT_PATTERN).unwrap();
    let splitter = Splitter::new().unwrap();
    for round in 0..3 {
        let t = std::time::Instant::now();
        let a: usize = docs.iter().map(|d| regex.find_iter(d).count()).sum();
        let regex_s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let b: usize = docs.iter().map(|d| splitter.split(d).count()).sum();
        let split_s = t.elapsed().as_secs_f64();
        assert_eq!(a, b);
        println!(
            "round {round}: {:.1} MB, {a} chunks: fancy-regex {:.1} MB/s, splitter {:.1} MB/s",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / regex_s,
            bytes as f64 / 1e6 / split_s
        );
    }
}
