//! `train tokenizer` then `train base` end to end on the bundled real text: the model learns
//! (validation bits per byte falls well below its start), the run directory holds what it
//! promises, and bad inputs fail with clear errors.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap()
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}

fn tokenizer(dir: &Path) -> PathBuf {
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
    assert!(tok.join("tokenizer.tiktoken").exists() && tok.join("tokenizer.json").exists());
    tok
}

#[test]
fn tiny_model_learns_real_text() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let run = dir.path().join("run");
    let out = train(&[
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
        "8",
        "--num-iterations",
        "200",
        // One micro-batch per step. The recipe scales every LR by sqrt(512 / 2^19) = 1/32 for
        // a batch this small; these are the setup_optimizer defaults times 32, so the effective
        // LRs are those defaults, and the Muon weight decay is off.
        "--total-batch-size",
        "512",
        "--unembedding-lr",
        "0.128",
        "--embedding-lr",
        "6.4",
        "--matrix-lr",
        "0.64",
        "--scalar-lr",
        "16",
        "--weight-decay",
        "0",
        "--warmup-steps",
        "10",
        "--eval-every",
        "50",
        "--eval-tokens",
        "8192",
        "--sample-every",
        "0",
        "--save-every",
        "100",
    ]);
    ok(&out);
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bpb: Vec<f64> = metrics.iter().filter_map(|m| m["val_bpb"].as_f64()).collect();
    assert_eq!(bpb.len(), 5, "evaluations at steps 0, 50, 100, 150 and the end");
    assert!(bpb[4] < 0.75 * bpb[0], "val bpb {bpb:?}");
    assert_eq!(metrics.iter().filter(|m| m["loss"].is_number()).count(), 200);
    for f in
        ["latest.json", "loss.svg", "tokenizer/tokenizer.tiktoken", "step_000200/model.safetensors"]
    {
        assert!(run.join(f).exists(), "{f}");
    }
    // The summary is a JSON line on stdout.
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 200);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let t = tok.to_str().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let err = |out: Output, want: &str| {
        assert_eq!(out.status.code(), Some(2));
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(e.contains(want), "expected {want:?} in: {e}");
    };
    err(train(&["base", "--tokenizer", t, "--out", r, "--data", "/nonexistent"]), "does not exist");
    // Train and validate on one bad file.
    let base_on = |data: &Path| {
        let d = data.to_str().unwrap();
        train(&["base", "--tokenizer", t, "--out", r, "--data", d, "--val", d])
    };
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    err(base_on(&empty), "no documents");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"body\": \"x\"}\n").unwrap();
    err(base_on(&bad), "`text`");
    err(
        train(&[
            "base",
            "--tokenizer",
            t,
            "--out",
            r,
            "--device-batch-size",
            "4",
            "--max-seq-len",
            "64",
            "--total-batch-size",
            "1000",
        ]),
        "not a multiple",
    );
    err(train(&["base", "--tokenizer", t, "--out", r, "--resume"]), "no checkpoint");
    err(train(&["base", "--tokenizer", "/nonexistent", "--out", r]), "tokenizer");
    // A checkpoint made with another tokenizer (vocab) is refused on resume.
    ok(&train(&[
        "base",
        "--tokenizer",
        t,
        "--out",
        r,
        "--depth",
        "1",
        "--max-seq-len",
        "32",
        "--device-batch-size",
        "2",
        "--total-batch-size",
        "64",
        "--num-iterations",
        "2",
        "--eval-tokens",
        "64",
    ]));
    let d = data();
    let tok2 = dir.path().join("tok2");
    ok(&train(&[
        "tokenizer",
        "--input",
        d.to_str().unwrap(),
        "--vocab-size",
        "600",
        "--out",
        tok2.to_str().unwrap(),
    ]));
    // Resuming with another tokenizer than the run's is refused (the run keeps its own copy).
    err(
        train(&["base", "--tokenizer", tok2.to_str().unwrap(), "--out", r, "--resume"]),
        "tokenizer",
    );
    // A tokenizer of another vocabulary copied over the run's own is refused by its vocab size.
    for f in ["tokenizer.tiktoken", "tokenizer.json"] {
        std::fs::copy(tok2.join(f), run.join("tokenizer").join(f)).unwrap();
    }
    err(train(&["base", "--out", r, "--resume", "--force", "--num-iterations", "3"]), "vocab size");
}

/// `train batches` writes the rows `train base` trains on: BOS-led rows of T + 1 tokens, the
/// validation rows and the byte length of every token.
#[test]
fn batches_writes_loader_rows() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let out_dir = dir.path().join("rows");
    let out = train(&[
        "batches",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--device-batch-size",
        "3",
        "--max-seq-len",
        "32",
        "--micro-batches",
        "5",
        "--eval-tokens",
        "256",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    ok(&out);
    let u32s = |name: &str| -> Vec<u32> {
        std::fs::read(out_dir.join(name))
            .unwrap()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (rows, val, bytes) = (u32s("train.u32"), u32s("val.u32"), u32s("token_bytes.u32"));
    assert_eq!(rows.len(), 5 * 3 * 33);
    assert_eq!(val.len() % 33, 0);
    assert!(val.len() / 33 >= 256 / 32);
    assert_eq!(bytes.len(), 512);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("meta.json")).unwrap()).unwrap();
    let bos = 512 - 9; // the first of the 9 specials appended after the BPE ranks
    assert_eq!(bytes[bos], 0, "specials have no bytes");
    for row in rows.chunks(33).chain(val.chunks(33)) {
        assert_eq!(row[0], bos as u32, "every row starts with BOS");
    }
    assert_eq!(meta["micro_batches"], 5);
    let bad = train(&[
        "batches",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        "x",
        "--micro-batches",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(2));
}
