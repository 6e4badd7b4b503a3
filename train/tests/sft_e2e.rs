//! `train sft` and `train mid` end to end: a tiny base model fine-tuned on conversations learns
//! them (validation bits per byte falls, the reply ends on `<|assistant_end|>`), the run
//! directory is the one `serve` loads, resume extends, and the bundled default mixture trains.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use femtochat_model::checkpoint::load_run;
use femtochat_model::generate::generate;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "stderr: {e}");
    e
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// A tokenizer on the bundled corpus and a depth-2 base model trained 30 steps.
fn base(dir: &Path) -> PathBuf {
    let tok = dir.join("tok");
    let d = data();
    ok(&train(&[
        "tokenizer",
        "--input",
        d.to_str().unwrap(),
        "--vocab-size",
        "512",
        "--out",
        tok.to_str().unwrap(),
    ]));
    let run = dir.join("base");
    ok(&train(&[
        "base",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--depth",
        "2",
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "4",
        "--total-batch-size",
        "256",
        "--num-iterations",
        "30",
        "--embedding-lr",
        "0.3",
        "--unembedding-lr",
        "0.008",
        "--matrix-lr",
        "0.02",
        "--eval-every",
        "0",
        "--eval-tokens",
        "256",
        "--sample-every",
        "0",
    ]));
    run
}

fn conversation(user: &str, assistant: &str) -> Conversation {
    Conversation {
        messages: vec![
            ChatMessage { role: "user".into(), content: Content::Text(user.into()) },
            ChatMessage { role: "assistant".into(), content: Content::Text(assistant.into()) },
        ],
    }
}

fn val_bpbs(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_bpb"].as_f64())
        .collect()
}

#[test]
fn sft_teaches_the_chat_format_and_serve_loads_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    // Two facts, many times over; the same two held out as validation.
    let facts = [("What is the capital of France?", "Paris."), ("Name a red fruit.", "An apple.")];
    let lines: String = (0..200)
        .map(|i| {
            let (u, a) = facts[i % 2];
            format!("{}\n", serde_json::to_string(&conversation(u, a)).unwrap())
        })
        .collect();
    let train_file = dir.path().join("facts.jsonl");
    std::fs::write(&train_file, &lines).unwrap();
    let sft = dir.path().join("sft");
    let (s, b, t) = (sft.to_str().unwrap(), base.to_str().unwrap(), train_file.to_str().unwrap());
    let args = [
        "sft",
        "--base",
        b,
        "--out",
        s,
        "--data",
        t,
        "--val",
        t,
        "--num-iterations",
        "40",
        "--eval-every",
        "20",
        "--eval-tokens",
        "256",
        "--save-every",
        "20",
    ];
    let err = ok(&train(&args));
    assert!(err.contains("warm-started the optimizer"), "{err}");
    let bpb = val_bpbs(&sft);
    assert_eq!(bpb.len(), 3, "at steps 0, 20 and 40");
    assert!(bpb[2] < 0.5 * bpb[0], "val bpb {bpb:?}");
    // The layout `serve` loads: the reply to a trained question ends on <|assistant_end|>.
    let (gpt, tok) = load_run(&sft, None).unwrap();
    let prompt = tok.render_for_completion(&conversation(facts[0].0, "")).unwrap();
    let end = tok.special("<|assistant_end|>").unwrap();
    let mut greedy =
        Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, 0).unwrap();
    let (ids, _) = generate(&gpt, &prompt, &mut greedy, 16, &[end, tok.bos()], |_| true).unwrap();
    assert_eq!(ids.last(), Some(&end), "{:?}", tok.decode(&ids));
    assert_eq!(tok.decode(&ids[..ids.len() - 1]).unwrap(), "Paris.");
    // The run records where it came from; resume extends it.
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sft.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["stage"], "sft");
    assert_eq!(run["details"]["base"]["step"], 30);
    assert!(run["details"]["base"]["config"]["n_layer"] == 2);
    let out = train(&[
        "sft",
        "--base",
        b,
        "--out",
        s,
        "--data",
        t,
        "--val",
        t,
        "--resume",
        "--num-iterations",
        "45",
    ]);
    ok(&out);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 45);
    // A second new run into the same directory is refused.
    let again = train(&args);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a run"));
}

/// The bundled default mixture (data/sft/) renders and trains; mid-training then SFT chain.
#[test]
fn default_mixture_and_mid_then_sft() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let mid = dir.path().join("mid");
    let (b, m) = (base.to_str().unwrap(), mid.to_str().unwrap());
    let err = ok(&train(&[
        "mid",
        "--base",
        b,
        "--out",
        m,
        "--num-iterations",
        "3",
        "--eval-every",
        "0",
        "--eval-tokens",
        "128",
    ]));
    assert!(err.contains("conversations from 9 sources"), "{err}");
    let bpb = val_bpbs(&mid);
    assert!(bpb.len() == 1 && bpb[0].is_finite());
    let sft = dir.path().join("sft");
    ok(&train(&[
        "sft",
        "--base",
        m,
        "--out",
        sft.to_str().unwrap(),
        "--num-iterations",
        "2",
        "--eval-every",
        "0",
        "--eval-tokens",
        "128",
        "--chatcore-every",
        "2",
        "--chatcore-max-problems",
        "2",
    ]));
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sft.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["details"]["base"]["dir"], m);
    // ChatCORE ran at the end, into metrics.jsonl and eval/chat.jsonl.
    let metrics = std::fs::read_to_string(sft.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.contains("\"chatcore\"")), "{metrics}");
    let chat = std::fs::read_to_string(sft.join("eval/chat.jsonl")).unwrap();
    assert_eq!(chat.lines().filter(|l| l.contains("\"task\"")).count(), 6, "{chat}");
    // Bad data is a clear error naming the file and line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"user\", \"content\": \"y\"}]}\n").unwrap();
    let out = train(&[
        "sft",
        "--base",
        b,
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--data",
        bad.to_str().unwrap(),
        "--num-iterations",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("bad.jsonl:1") && e.contains("expected role \"assistant\""), "{e}");
}
