//! CORE against nanochat's core_eval.py run on the bundled data with the fixture tokenizer
//! (`train/tests/fixtures/nanochat_core.json`: the selected row, few-shot indices, the Jinja
//! prompts, and the scoring spans of batch_sequences_*), plus the scorer on a tiny model.
use std::path::PathBuf;

use femtochat_engine::{Ids, Reduction};
use femtochat_model::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, parse_tiktoken};
use femtochat_model::{GPTConfig, Gpt};
use serde_json::Value;

use super::bundle::{Bundle, TaskType};
use super::core::*;
use super::core_run::{CoreOptions, run};
use crate::tasks::{bundled, read_jsonl};

pub fn fixture_tokenizer() -> Tokenizer {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
    let text = std::fs::read_to_string(p).unwrap();
    Tokenizer::new(parse_tiktoken(&text).unwrap(), &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap()
}

pub fn tiny_gpt(vocab: usize, seq: usize) -> Gpt {
    let c = GPTConfig {
        sequence_len: seq,
        vocab_size: vocab,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 2,
        n_embd: 32,
        window_pattern: "L".into(),
    };
    let gpt = Gpt::init(c, 3).unwrap();
    // Fresh init zeroes the output projections and nearly flattens the logits; perturb every
    // weight so attention matters and losses differ between choices.
    let mut rng = femtochat_model::rng::Rng::new(9);
    for (_, t) in gpt.params().iter() {
        t.with_data_mut(|d| d.iter_mut().for_each(|x| *x += 0.05 * rng.normal())).unwrap();
    }
    gpt
}

fn bundle() -> Bundle {
    Bundle::load(&bundled("data/eval/core").unwrap()).unwrap()
}

#[test]
fn selection_fewshot_rendering_and_spans_match_nanochat() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nanochat_core.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let b = bundle();
    let tok = fixture_tokenizer();
    for case in &cases {
        let label = case["task"].as_str().unwrap();
        let mut task = b.tasks.iter().find(|t| t.label == label).unwrap().clone();
        task.num_fewshot = case["num_fewshot"].as_u64().unwrap() as usize;
        let rows = select_rows(read_jsonl(&b.data_file(&task).unwrap()).unwrap(), Some(50));
        let idx = case["idx"].as_u64().unwrap() as usize;
        assert_eq!(rows[idx], case["row"], "{label}: selected row");
        let shots = fewshot_indices(idx, rows.len(), task.num_fewshot).unwrap();
        assert_eq!(serde_json::to_value(&shots).unwrap(), case["fewshot_indices"], "{label}");
        let shot_rows: Vec<&Value> = shots.iter().map(|&i| &rows[i]).collect();
        let prompts = render(&task, &rows[idx], &shot_rows).unwrap();
        assert_eq!(serde_json::to_value(&prompts).unwrap(), case["prompts"], "{label}: prompts");
        let s = spans(task.task_type, &tok, &prompts, usize::MAX).unwrap();
        let get = |f: fn(&Scored) -> usize| {
            serde_json::to_value(s.iter().map(f).collect::<Vec<_>>()).unwrap()
        };
        assert_eq!(get(|x| x.start), case["starts"], "{label}: starts");
        assert_eq!(get(|x| x.end), case["ends"], "{label}: ends");
        assert_eq!(get(|x| x.tokens.len()), case["lengths"], "{label}: lengths");
    }
}

#[test]
fn scoring_spans_on_a_hand_built_case() {
    let seqs = |v: &[&[u32]]| v.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
    // Multiple choice: shared context [9, 1, 2], choices differ after it.
    assert_eq!(
        common_length(&seqs(&[&[9, 1, 2, 5, 6], &[9, 1, 2, 7], &[9, 1, 2, 5, 8]]), false),
        3
    );
    // Schema: contexts differ, the continuation [4, 4] is shared (and the 3 before it too).
    assert_eq!(common_length(&seqs(&[&[9, 1, 3, 4, 4], &[9, 2, 2, 3, 4, 4]]), true), 3);
    // One sequence a prefix of another: the common part is the shorter one.
    assert_eq!(common_length(&seqs(&[&[9, 1], &[9, 1, 2]]), false), 2);
    // Python's lst.index(min(lst)): first minimum; a leading NaN stays the minimum.
    assert_eq!(argmin_like_python(&[2.0, 1.0, 1.0, 3.0]), 1);
    assert_eq!(argmin_like_python(&[f64::NAN, 1.0]), 0);
    assert_eq!(argmin_like_python(&[2.0, f64::NAN, 1.0]), 2);
    // Left crop keeps the span: 8 tokens, span [5, 8), cropped to 4 -> span [1, 4).
    let tok = fixture_tokenizer();
    let lm = |max| {
        spans(TaskType::LanguageModeling, &tok, &["a b c d".into(), "a b c d e f".into()], max)
    };
    let full = lm(usize::MAX).unwrap();
    let cropped = lm(full[0].end - full[0].start + 1).unwrap();
    assert_eq!(cropped[0].tokens, full[0].tokens[full[0].tokens.len() - cropped[0].tokens.len()..]);
    assert_eq!((cropped[0].start, cropped[0].end), (1, cropped[0].tokens.len()));
    assert!(lm(full[0].end - full[0].start).is_err(), "a crop into the span is refused");
    assert_eq!(centered(0.625, 25.0), 0.5);
}

/// Batched, padded scoring with the lm head at the span positions only equals scoring each
/// sequence alone with the full per-token loss.
#[test]
fn batched_scoring_equals_one_at_a_time() {
    let gpt = tiny_gpt(64, 32);
    let seqs: Vec<Scored> =
        [(vec![1u32, 5, 9, 3, 7, 2], 3), (vec![1, 4, 4], 1), (vec![1, 8, 6, 2, 2, 2, 9, 9, 1], 6)]
            .into_iter()
            .map(|(t, start)| Scored { end: t.len(), start, tokens: t })
            .collect();
    let batched = score(&gpt, 0, &seqs, 10).unwrap();
    for (s, got) in seqs.iter().zip(&batched) {
        let n = s.tokens.len();
        let targets: Vec<i32> = s.tokens[1..].iter().map(|&x| x as i32).chain([-1]).collect();
        let losses = gpt
            .loss(&Ids::new(s.tokens.clone(), &[1, n]).unwrap(), &targets, Reduction::None)
            .unwrap()
            .to_vec();
        let want: f64 = losses[s.start - 1..s.end - 1].iter().map(|&l| l as f64).sum::<f64>()
            / (s.end - s.start) as f64;
        assert!(
            (got.mean_loss - want).abs() < 1e-4 * want.abs().max(1.0),
            "{} vs {want}",
            got.mean_loss
        );
    }
}

/// Scoring through a shared prefix and a KV cache equals scoring each sequence whole, for
/// multiple-choice spans (starting at the end of the common prefix), schema spans (contexts
/// differ after a shared part) and a one-token choice.
#[test]
fn shared_prefix_scoring_equals_batched_scoring() {
    let gpt = tiny_gpt(64, 32);
    let mc: Vec<Scored> = [
        vec![1u32, 5, 9, 3, 7, 2],
        vec![1, 5, 9, 3, 4],
        vec![1, 5, 9, 3, 8, 8, 8, 2],
        vec![1, 5, 9, 3],
    ]
    .into_iter()
    .map(|t| Scored { start: 3, end: t.len(), tokens: t })
    .collect();
    let schema: Vec<Scored> = [vec![1u32, 5, 9, 6, 2, 4, 4], vec![1, 5, 8, 2, 4, 4]]
        .into_iter()
        .map(|t| Scored { start: t.len() - 2, end: t.len(), tokens: t })
        .collect();
    for seqs in [mc, schema] {
        let a = score(&gpt, 0, &seqs, 64).unwrap();
        let b = score_shared(&gpt, 0, &seqs).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x.mean_loss - y.mean_loss).abs() < 1e-4, "{} vs {}", x.mean_loss, y.mean_loss);
            assert_eq!(x.greedy_match, y.greedy_match);
        }
    }
}

/// End to end on two real tasks: per-task lines with n, centered accuracy and the summary.
#[test]
fn core_runs_on_a_tiny_model() {
    let tok = fixture_tokenizer();
    let gpt = tiny_gpt(tok.vocab_size(), 64);
    let opts = CoreOptions {
        max_per_task: Some(12),
        tasks: vec!["copa".into(), "bigbench_operators".into()],
        show_progress: false,
        split: false,
    };
    let report = run(&gpt, &tok, &bundle(), &opts).unwrap();
    assert_eq!(report.tasks.len(), 2);
    for t in &report.tasks {
        assert_eq!(t.n, 12);
        assert!((0.0..=1.0).contains(&t.accuracy));
    }
    let lines = report.lines();
    assert_eq!(lines.len(), 3);
    assert!(lines[2]["core"].is_f64() && lines[0]["centered"].is_f64());
    let few = CoreOptions { max_per_task: Some(3), ..opts.clone() };
    let err = run(&gpt, &tok, &bundle(), &few).unwrap_err();
    assert!(format!("{err:#}").contains("10 few-shot examples need more than 3 rows"), "{err:#}");
    let all = run(&gpt, &tok, &bundle(), &CoreOptions { tasks: vec!["squad".into()], ..opts })
        .unwrap_err();
    assert!(all.to_string().contains("no CORE task had data"), "{all}");
}
