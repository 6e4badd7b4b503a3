//! `train report` on a fixture set of run directories: every section, the stages' numbers.
use super::*;
use femtochat_model::GPTConfig;
use femtochat_model::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN};
use serde_json::json;

fn write_lines(path: &Path, lines: &[Value]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// A run directory as the stages leave it: run.json, metrics, a checkpoint's state.json.
fn fixture_run(dir: &Path, stage: &str, metrics: &[Value], steps: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let record = json!({
        "run_id": "r", "stage": stage, "command": format!("train {stage} --out {}", dir.display()),
        "flags": {}, "data": [], "val": [], "tokenizer": {}, "details": {}
    });
    std::fs::write(dir.join("run.json"), record.to_string()).unwrap();
    write_lines(&dir.join("metrics.jsonl"), metrics);
    let settings = trainer::Settings {
        model: GPTConfig {
            sequence_len: 64,
            vocab_size: 512,
            n_layer: 2,
            n_head: 2,
            n_kv_head: 2,
            n_embd: 64,
            window_pattern: "L".into(),
        },
        device_batch_size: 4,
        grad_accum_steps: 1,
        num_iterations: steps,
        warmup_steps: 0,
        warmdown_ratio: 0.5,
        final_lr_frac: 0.0,
        unembedding_lr: 0.004,
        embedding_lr: 0.2,
        matrix_lr: 0.02,
        scalar_lr: 0.5,
        weight_decay: 0.0,
        lr_schedule: trainer::LrSchedule::Base,
        lr_scale: 1.0,
        eval_every: 0,
        save_every: 0,
        sample_every: 0,
        seed: 1,
    };
    let ckpt = dir.join(format!("step_{steps:06}"));
    std::fs::create_dir_all(&ckpt).unwrap();
    let state =
        trainer::CheckpointState { step: steps, source: json!({}), settings, run_id: "r".into() };
    std::fs::write(ckpt.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::write(
        dir.join("latest.json"),
        json!({ "step": steps, "dir": format!("step_{steps:06}") }).to_string(),
    )
    .unwrap();
}

fn step(i: u64, loss: f64) -> Value {
    json!({ "step": i, "loss": loss, "lr_mult": 1.0, "dt_ms": 500.0, "tok_per_s": 512.0 })
}

#[test]
fn report_renders_every_section_from_fixture_runs() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let ranks = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
    let text = std::fs::read_to_string(&ranks).unwrap();
    let tok =
        Tokenizer::new(parse_tiktoken(&text).unwrap(), &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap();
    tok.save(&root.join("tok")).unwrap();
    let corpus = root.join("corpus.txt");
    std::fs::write(&corpus, "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();

    let base = root.join("base");
    fixture_run(
        &base,
        "base",
        &[step(0, 6.0), step(1, 5.0), json!({"step": 2, "val_bpb": 1.75})],
        2,
    );
    write_lines(
        &base.join("eval/core.jsonl"),
        &[
            json!({"task": "hellaswag", "accuracy": 0.3, "centered": 0.0667, "n": 10, "step": 2}),
            json!({"task": "arc_easy", "accuracy": 0.4, "centered": 0.2, "n": 10, "step": 2}),
            json!({"core": 0.1333, "tasks": 2, "missing": [], "step": 2}),
        ],
    );
    let sft = root.join("sft");
    // Step 1 had nothing to learn: its loss is null, yet it is a step.
    let sft_metrics = [
        step(0, 2.0),
        json!({"step": 1, "loss": null, "lr_mult": 0.5, "dt_ms": 500.0}),
        json!({"step": 2, "val_bpb": 1.5}),
    ];
    fixture_run(&sft, "sft", &sft_metrics, 2);
    write_lines(
        &sft.join("eval/chat.jsonl"),
        &[
            // An older evaluation, superseded by the newest one.
            json!({"task": "gsm8k", "accuracy": 0.01, "n": 8, "step": 0}),
            json!({"task": "arc-easy", "accuracy": 0.5, "n": 8, "step": 1}),
            json!({"task": "gsm8k", "accuracy": 0.125, "n": 8, "step": 1}),
            json!({"chatcore": 0.2917, "tasks": ["arc-easy", "gsm8k"], "step": 1}),
        ],
    );
    let rl = root.join("rl");
    fixture_run(
        &rl,
        "rl",
        &[
            json!({"step": 0, "pass@1": 0.1, "pass@2": 0.2}),
            json!({"step": 0, "loss": -0.01, "lr_mult": 1.0, "reward": 0.25, "generated_tokens": 300, "dt_ms": 1000.0}),
            json!({"step": 1, "loss": -0.02, "lr_mult": 0.5, "reward": 0.5, "generated_tokens": 200, "dt_ms": 1000.0}),
            json!({"step": 2, "pass@1": 0.25, "pass@2": 0.375}),
        ],
        2,
    );
    let dirs = [rl.clone(), root.join("tok"), sft.clone(), base.clone()];
    let mut r = gather(
        &dirs,
        std::slice::from_ref(&corpus),
        // Stand-ins for GPT-2's and GPT-4's rank files (the same format), each split with its
        // own pattern.
        &[("gpt2".to_string(), ranks.clone()), ("gpt4".to_string(), ranks.clone())],
        Some(1e9),
        Machine { cpu: "test cpu".into(), ..Default::default() },
    )
    .unwrap();
    let out = root.join("report");
    write(&mut r, &out).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "## Machine",
        "## Tokenizer",
        "## BASE",
        "## SFT",
        "## RL",
        "## Summary",
        "test cpu",
        "Commit:",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    // Stages in pipeline order, numbers from the fixtures.
    let names: Vec<&str> = r.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(names, ["base", "sft", "rl"]);
    let (b, s, l) = (&r.stages[0], &r.stages[1], &r.stages[2]);
    assert_eq!((b.steps, b.tokens, b.val_bpb, b.core), (2, 2 * 256, Some(1.75), Some(0.1333)));
    assert_eq!(b.train_seconds, 1.0);
    assert_eq!(b.core_tasks.len(), 2);
    assert!(md.contains("| arc_easy | 0.4000 | 0.2000 |"), "{md}");
    assert_eq!(s.chat, [("arc-easy".to_string(), 0.5), ("gsm8k".to_string(), 0.125)]);
    assert_eq!(s.chatcore, Some(0.2917));
    assert_eq!((s.steps, s.tokens, s.final_loss, s.val_bpb), (2, 2 * 256, Some(2.0), Some(1.5)));
    assert_eq!((l.reward, l.tokens, l.pass_at_k.clone()), (Some(0.5), 500, vec![0.25, 0.375]));
    assert!(md.contains("pass@1: 0.2500, pass@2: 0.3750"), "{md}");
    assert!(md.contains("| GSM8K | - | 0.1250 | - |"), "{md}");
    assert!(md.contains("| CORE | 0.1333 | - | - |"), "{md}");
    assert!(md.contains("| RL pass@1 | - | - | 0.2500 |"), "{md}");
    // Tokenizer compression on the given text.
    let t = r.tokenizer.as_ref().unwrap();
    let who: Vec<&str> = t.compression.iter().map(|c| c.tokenizer.as_str()).collect();
    assert_eq!(who, ["ours", "gpt2", "gpt4"]);
    assert!(md.contains("| gpt2 | corpus.txt |") && md.contains("| gpt4 | corpus.txt |"), "{md}");
    let docs: Vec<String> =
        crate::docs::documents(std::slice::from_ref(&corpus)).map(|d| d.unwrap()).collect();
    assert_eq!(t.compression[0].bytes, docs.iter().map(String::len).sum::<usize>());
    assert!(t.compression[0].bytes_per_token > 1.5, "{:?}", t.compression[0]);
    // Plots exist and are referenced; report.json holds the same numbers.
    for f in ["loss_base.svg", "loss_sft.svg", "loss_rl.svg", "scores.svg"] {
        assert!(out.join(f).exists(), "{f}");
        assert!(md.contains(f), "{f} not referenced");
    }
    let j: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(j["stages"][2]["pass_at_k"], json!([0.25, 0.375]));
    assert_eq!(j["stages"][0]["core"], json!(0.1333));
}
