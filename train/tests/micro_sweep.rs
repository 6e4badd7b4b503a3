//! `train micro` and `train sweep` end to end through the CLI, on a small generated corpus.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap()
}

fn ok(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn err(out: &Output, want: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains(want), "expected {want:?} in: {e}");
}

/// About 6,000 characters of English over a 31-character vocabulary.
fn corpus(dir: &Path) -> (PathBuf, usize) {
    let text = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor \
                jugs! how vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.\n"
        .repeat(40);
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text).unwrap();
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    chars.dedup();
    (path, chars.len())
}

fn micro(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["micro", "--data", d, "--out", o, "--eval-windows", "8"];
    args.extend_from_slice(extra);
    train(&args)
}

#[test]
fn bigram_at_step_zero_reports_ln_vocab_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let (data, v) = corpus(dir.path());
    for mode in ["scalar", "tensor"] {
        let out = dir.path().join(mode);
        let s = ok(&micro(&data, &out, &["--model", "bigram", "--mode", mode, "--steps", "0"]));
        let ln_v = (v as f64).ln();
        for key in ["final_loss", "val_loss"] {
            let got = s[key].as_f64().unwrap();
            assert!((got - ln_v).abs() < 1e-6, "{mode} {key}: {got} vs ln {v} = {ln_v}");
        }
        assert_eq!(s["engine"], mode);
        assert_eq!(s["device"], "cpu");
        assert!(s["adapter"].is_string());
        assert_eq!(s["params"], v * v);
        assert!(out.join("model.json").exists() && out.join("summary.json").exists());
    }
}

/// The same mini-GPT, initial numbers and batches on both engines: the losses track each other
/// (f64 against f32, so not to the last bit: Adam's normalised steps amplify the rounding
/// differences to ~0.5% by step 12), and training lowers them.
#[test]
fn mini_gpt_losses_agree_between_engines_and_fall() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus(dir.path());
    let args = ["--model", "mini-gpt", "--steps", "12", "--eval-every", "0", "--lr", "0.03"];
    let losses = |mode: &str| -> Vec<f64> {
        let out = dir.path().join(mode);
        let mut a = args.to_vec();
        a.extend(["--mode", mode]);
        ok(&micro(&data, &out, &a));
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let (s, t) = (losses("scalar"), losses("tensor"));
    assert_eq!(s.len(), 12);
    assert!((s[0] - t[0]).abs() < 1e-5, "step 0: {} vs {}", s[0], t[0]);
    for (a, b) in s.iter().zip(&t) {
        assert!((a - b).abs() < 1e-2 * a, "scalar {s:?}\ntensor {t:?}");
    }
    assert!(s[11] < s[0] - 0.3, "{s:?}");
}

#[test]
fn sampling_continues_the_prompt_and_bad_options_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus(dir.path());
    let out = dir.path().join("run");
    let base = ["--model", "mini-gpt", "--mode", "tensor", "--steps", "5", "--block-size", "8"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        micro(&data, &out, &a)
    };
    let s = ok(&with(&["--prompt", "the fox", "--max-new-tokens", "20", "--temperature", "0.8"]));
    let sample = s["sample"].as_str().unwrap();
    assert!(sample.starts_with("the fox"), "{sample}");
    assert_eq!(sample.chars().count(), 27);
    err(&with(&["--prompt", "the fox", "--temperature", "0"]), "--temperature must be > 0");
    err(&with(&["--prompt", "x", "--temperature=-1"]), "--temperature must be > 0");
    err(&with(&["--prompt", "the lazy dog"]), "longer than the model's context of 8");
    err(&with(&["--prompt", "the fox!?"]), "not in the corpus vocabulary");
    let scalar_gpu = ["--model", "bigram", "--mode", "scalar", "--device", "gpu"];
    err(&micro(&data, &out, &scalar_gpu), "CPU only");
}

fn csv_rows(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    // No commas inside fields here except the quoted variant column.
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .map(|l| {
            let (variant, rest) = l[1..].split_once("\",").unwrap();
            let mut r = vec![variant.to_string()];
            r.extend(rest.split(',').map(String::from));
            r
        })
        .collect();
    (header, rows)
}

#[test]
fn sweep_writes_a_row_per_run_skips_finished_runs_and_counts_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus(dir.path());
    let out = dir.path().join("sweep");
    let (o, d) = (out.to_str().unwrap(), data.to_str().unwrap());
    let grid = "tie_lm_head=true,false input_rmsnorm=true,false";
    let sweep = || {
        train(&[
            "--threads",
            "1",
            "sweep",
            "--grid",
            grid,
            "--steps",
            "4",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--out",
            o,
            "--",
            "micro",
            "--model",
            "mini-gpt",
            "--mode",
            "tensor",
            "--data",
            d,
            "--eval-every",
            "2",
            "--eval-windows",
            "4",
        ])
    };
    let first = ok(&sweep());
    assert_eq!((first["runs"].as_u64(), first["ran"].as_u64()), (Some(8), Some(8)));
    let (header, rows) = csv_rows(&out.join("summary.csv"));
    let want = "variant,tie_lm_head,input_rmsnorm,seed,params,steps,tokens,seconds,tok_per_s,\
                final_loss,val_loss,val_bpb,commit,run_dir";
    assert_eq!(header.join(","), want);
    assert_eq!(rows.len(), 8);
    let jsonl = std::fs::read_to_string(out.join("summary.jsonl")).unwrap();
    let rows_json: Vec<serde_json::Value> =
        jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows_json.len(), 8);
    for r in &rows_json {
        for k in header.iter() {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
        assert_eq!(r["steps"], 4);
        assert!(r["val_bpb"].as_f64().unwrap() > 0.0);
    }
    let params = |tied: &str| -> Vec<u64> {
        rows_json
            .iter()
            .filter(|r| r["tie_lm_head"] == tied)
            .map(|r| r["params"].as_u64().unwrap())
            .collect()
    };
    let (tied, untied) = (params("true"), params("false"));
    assert_eq!((tied.len(), untied.len()), (4, 4));
    assert!(untied.iter().all(|u| tied.iter().all(|t| u > t)), "{tied:?} {untied:?}");
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| ") && l.contains(" ± ")).count(), 4, "{md}");
    for f in ["loss.svg", "val.svg"] {
        assert!(out.join(f).exists(), "{f}");
    }

    // A re-run finds every run finished; a lost run is the only one redone.
    let again = ok(&sweep());
    assert_eq!((again["ran"].as_u64(), again["skipped"].as_u64()), (Some(0), Some(8)));
    let lost =
        Path::new(&rows_json[0]["run_dir"].as_str().unwrap().to_string()).join("sweep_row.json");
    std::fs::remove_file(lost).unwrap();
    let third = ok(&sweep());
    assert_eq!((third["ran"].as_u64(), third["skipped"].as_u64()), (Some(1), Some(7)));
    assert_eq!(csv_rows(&out.join("summary.csv")).1.len(), 8);

    err(
        &train(&[
            "sweep",
            "--grid",
            "no_such_option=1,2",
            "--steps",
            "2",
            "--out",
            o,
            "--",
            "micro",
        ]),
        "does not parse",
    );
    err(
        &train(&["sweep", "--grid", "seed=1,2", "--steps", "2", "--out", o, "--", "micro"]),
        "set by the sweep",
    );
}

/// A sweep over `train base`: each variant is a pretraining run, its parameter count read from
/// its checkpoint.
#[test]
fn sweep_over_base_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus(dir.path());
    let val = dir.path().join("val.txt");
    std::fs::copy(&data, &val).unwrap();
    let tok = dir.path().join("tok");
    let (d, v, t) = (data.display(), val.display(), tok.display());
    let tok_args = format!("tokenizer --input {d} --vocab-size 300 --out {t}");
    ok_status(&train(&tok_args.split_whitespace().collect::<Vec<_>>()));
    let out = dir.path().join("sweep");
    let args = format!(
        "--threads 1 sweep --grid depth=1,2 --steps 2 --out {} -- base --tokenizer {t} --data {d} \
         --val {v} --max-seq-len 32 --device-batch-size 2 --warmup-steps 1 --eval-every 0 \
         --eval-tokens 128 --sample-every 0 --save-every 0",
        out.display()
    );
    let s = ok(&train(&args.split_whitespace().collect::<Vec<_>>()));
    assert_eq!(s["ran"], 2);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("summary.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let params: Vec<u64> = rows.iter().map(|r| r["params"].as_u64().unwrap()).collect();
    assert!(params[0] > 0 && params[1] > params[0], "{params:?}");
    assert!(rows.iter().all(|r| r["val_bpb"].as_f64().is_some() && r["steps"] == 2));
}

fn ok_status(out: &Output) {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}
