//! Same seed, data, config, thread count and device: bit-identical metrics and checkpoints
//! (docs/research.md, "Determinism"). Wall-clock fields are the only ones allowed to differ.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Metrics fields that measure time, not the computation.
const TIMING: [&str; 3] = ["dt_ms", "tok_per_s", "tflops"];

fn train(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// metrics.jsonl with the timing fields removed, as JSON text (floats as printed, i.e. exact).
fn metrics(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).unwrap();
            v.retain(|k, _| !TIMING.contains(&k.as_str()));
            serde_json::Value::Object(v).to_string()
        })
        .collect()
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

fn corpus(dir: &Path) -> (PathBuf, PathBuf) {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it \
                was the age of foolishness, it was the epoch of belief.\n\n"
        .repeat(60);
    let (t, v) = (dir.join("a_train.txt"), dir.join("b_val.txt"));
    std::fs::write(&t, &text).unwrap();
    std::fs::write(&v, &text[..2000]).unwrap();
    (t, v)
}

#[test]
fn micro_runs_are_bit_identical_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus(dir.path());
    for mode in ["scalar", "tensor"] {
        let run = |name: &str| {
            let out = dir.path().join(format!("{mode}-{name}"));
            train(&[
                "--threads",
                "1",
                "micro",
                "--model",
                "mini-gpt",
                "--mode",
                mode,
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "6",
                "--eval-every",
                "3",
                "--eval-windows",
                "4",
                "--prompt",
                "It",
                "--max-new-tokens",
                "16",
                "--seed",
                "7",
            ]);
            out
        };
        let (a, b) = (run("a"), run("b"));
        assert_eq!(metrics(&a), metrics(&b), "{mode}");
        assert_eq!(metrics(&a).len(), 9);
        same_bytes(&a.join("model.json"), &b.join("model.json"));
        let sample = |d: &Path| -> serde_json::Value {
            serde_json::from_slice::<serde_json::Value>(
                &std::fs::read(d.join("summary.json")).unwrap(),
            )
            .unwrap()["sample"]
                .clone()
        };
        assert_eq!(sample(&a), sample(&b));
        // Another seed is another run: the streams really come from the seed.
        let c = dir.path().join(format!("{mode}-c"));
        train(&[
            "--threads",
            "1",
            "micro",
            "--model",
            "mini-gpt",
            "--mode",
            mode,
            "--data",
            data.to_str().unwrap(),
            "--out",
            c.to_str().unwrap(),
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--eval-windows",
            "4",
            "--seed",
            "8",
        ]);
        assert_ne!(metrics(&a), metrics(&c));
    }
}

#[test]
fn base_runs_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (t, v) = corpus(dir.path());
    let tok = dir.path().join("tok");
    train(&[
        "tokenizer",
        "--input",
        t.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]);
    let run = |name: &str| {
        let out = dir.path().join(name);
        train(&[
            "--threads",
            "1",
            "base",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
            t.to_str().unwrap(),
            "--val",
            v.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--depth",
            "1",
            "--max-seq-len",
            "32",
            "--device-batch-size",
            "2",
            "--num-iterations",
            "4",
            "--warmup-steps",
            "1",
            "--eval-every",
            "2",
            "--eval-tokens",
            "256",
            "--sample-every",
            "0",
            "--save-every",
            "2",
        ]);
        out
    };
    let (a, b) = (run("a"), run("b"));
    assert_eq!(metrics(&a), metrics(&b));
    assert!(metrics(&a).len() >= 6, "{:?}", metrics(&a));
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        same_bytes(&a.join("step_000004").join(f), &b.join("step_000004").join(f));
    }
}
