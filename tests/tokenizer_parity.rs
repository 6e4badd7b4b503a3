//! The tokenizer against rustbpe 0.1.0 + tiktoken 0.14.0 (tests/fixtures/tokenizer/, copied from
//! the reference fixtures): training reproduces the rank files exactly, encoding and chat
//! rendering give exactly the reference ids and masks.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use femtochat::model::tokenizer::{Conversation, Tokenizer, parse_tiktoken};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn jsonl(name: &str) -> Vec<serde_json::Value> {
    let f = std::fs::File::open(fixtures().join(name)).unwrap();
    let lines: Box<dyn BufRead> = if name.ends_with(".gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    lines.lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect()
}

fn reference(v: usize) -> Tokenizer {
    let text = std::fs::read_to_string(fixtures().join(format!("ranks_{v}.tiktoken"))).unwrap();
    let ranks = parse_tiktoken(&text).unwrap();
    Tokenizer::new(
        ranks,
        &femtochat::model::tokenizer::SPECIAL_TOKENS,
        femtochat::model::tokenizer::SPLIT_PATTERN,
    )
    .unwrap()
}

fn check_training(v: usize) {
    let docs: Vec<String> = jsonl(&format!("train_docs_{v}.jsonl.gz"))
        .into_iter()
        .map(|d| d["text"].as_str().unwrap().to_string())
        .collect();
    let ours = Tokenizer::train(&docs, v).unwrap();
    let want = reference(v);
    assert_eq!(ours.vocab_size(), want.vocab_size());
    let mut first_diff = None;
    for id in 0..v as u32 {
        if ours.token_bytes(id) != want.token_bytes(id) {
            first_diff.get_or_insert(id);
        }
    }
    assert_eq!(first_diff, None, "vocab {v}: first differing rank");
}

#[test]
fn training_reproduces_rustbpe_2048() {
    check_training(2048);
}

#[test]
fn training_reproduces_rustbpe_8192() {
    check_training(8192);
}

#[test]
fn encoding_matches_tiktoken() {
    for v in [2048, 8192] {
        let tok = reference(v);
        for case in jsonl(&format!("encode_{v}.jsonl")) {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text), want, "vocab {v}: {text:?}");
            assert_eq!(tok.decode(&want).unwrap(), text);
        }
    }
}

/// Encoding remembers multi-token chunks per thread: alternating two tokenizers on one thread,
/// and encoding everything twice (the second time from memory), still gives each its own ids.
#[test]
fn encoding_matches_tiktoken_with_alternating_tokenizers() {
    let toks = [(2048, reference(2048)), (8192, reference(8192))];
    let cases: Vec<Vec<(String, Vec<u32>)>> = toks
        .iter()
        .map(|(v, _)| {
            jsonl(&format!("encode_{v}.jsonl"))
                .into_iter()
                .map(|c| {
                    let ids = c["ids"].as_array().unwrap().iter();
                    let ids = ids.map(|x| x.as_u64().unwrap() as u32).collect();
                    (c["text"].as_str().unwrap().to_string(), ids)
                })
                .collect()
        })
        .collect();
    for _ in 0..2 {
        for i in 0..cases[0].len().max(cases[1].len()) {
            for (k, (v, tok)) in toks.iter().enumerate() {
                if let Some((text, want)) = cases[k].get(i) {
                    assert_eq!(&tok.encode(text), want, "vocab {v}: {text:?}");
                }
            }
        }
    }
}

#[test]
fn chat_rendering_matches_nanochat() {
    for v in [2048, 8192] {
        let tok = reference(v);
        let mut n = 0;
        for case in jsonl(&format!("chat_{v}.jsonl")) {
            let conv: Conversation = serde_json::from_value(case["conversation"].clone()).unwrap();
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            if case["render_for_completion"].as_bool() == Some(true) {
                assert_eq!(tok.render_for_completion(&conv).unwrap(), ids);
            } else {
                let max = case["max_tokens"].as_u64().map_or(2048, |m| m as usize);
                let mask: Vec<u8> = case["mask"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u8)
                    .collect();
                let (got_ids, got_mask) = tok.render_conversation(&conv, max).unwrap();
                assert_eq!(got_ids, ids, "vocab {v}: {conv:?}");
                assert_eq!(got_mask, mask, "vocab {v}: mask of {conv:?}");
            }
            n += 1;
        }
        assert_eq!(n, 5);
    }
}
