//! `train import-nanochat` and `train export-nanochat` as a user runs them: a femtochat run goes
//! to nanochat's layout and back, and `train base --resume` trains on from the imported run;
//! nanochat's own fixture imports with a JSON line on stdout and its provenance recorded.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap()
}

fn ok(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn export_import_and_resume_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, run, nc, imported) = (
        dir.path().join("tok"),
        dir.path().join("run"),
        dir.path().join("nc"),
        dir.path().join("imp"),
    );
    let data = repo("data");
    ok(&train(&["tokenizer", "--input", s(&data), "--vocab-size", "300", "--out", s(&tok)]));
    let small = "--depth 2 --max-seq-len 32 --device-batch-size 2 --total-batch-size 64 \
                 --eval-every 0 --eval-tokens 1024 --sample-every 0";
    let mut args = vec!["base", "--tokenizer", s(&tok), "--out", s(&run), "--num-iterations", "3"];
    args.extend(small.split_whitespace());
    ok(&train(&args));

    let line = ok(&train(&["export-nanochat", s(&run), "--out", s(&nc)]));
    let ckpt = nc.join("base_checkpoints/d2");
    assert_eq!(line["checkpoint_dir"].as_str(), Some(s(&ckpt)));
    for f in ["model_000003.pt", "meta_000003.json", "optim_000003_rank0.pt"] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    let line = ok(&train(&["import-nanochat", s(&nc), "--out", s(&imported), "--optimizer"]));
    assert_eq!((line["tag"].as_str(), line["step"].as_u64()), (Some("d2"), Some(3)));

    // Train two more steps on the imported run.
    let out = train(&["base", "--resume", "--out", s(&imported), "--num-iterations", "5"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run.json"));
    let metrics = std::fs::read_to_string(imported.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["loss"].is_number())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 4]);

    // An existing run is never overwritten by an import.
    let out = train(&["import-nanochat", s(&nc), "--out", s(&imported)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a run"));
}

#[test]
fn nanochat_fixture_imports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let fixture = repo("tests/fixtures/nanochat_checkpoint");
    let line = ok(&train(&["import-nanochat", s(&fixture), "--out", s(&out), "--source", "base"]));
    assert_eq!((line["source"].as_str(), line["step"].as_u64()), (Some("base"), Some(30)));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("imported.json")).unwrap()).unwrap();
    assert_eq!(record["meta"]["model_config"]["n_kv_head"], 1);
    assert!(
        out.join("tokenizer/tokenizer.json").is_file()
            && out.join("step_000030/state.json").is_file()
    );
    // A source that is not there, and a directory that is not nanochat's.
    let err = train(&[
        "import-nanochat",
        s(&fixture),
        "--out",
        s(&dir.path().join("x")),
        "--source",
        "rl",
    ]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("chatrl_checkpoints"));
    let err = train(&["import-nanochat", s(dir.path()), "--out", s(&dir.path().join("y"))]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("not a nanochat directory"));
}
