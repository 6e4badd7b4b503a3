//! benches/vs_nanochat.py without training: its results from a committed sample of raw outputs
//! (benches/testdata/vs_nanochat: a real 6-step CPU run of both sides), checked against numbers
//! recomputed here from the same files; and its refusal of an unpinned or missing commit.
//! Needs python3 (standard library only).
use std::path::Path;
use std::process::{Command, Output};

fn script(args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("python3")
        .arg(root.join("benches/vs_nanochat.py"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("python3 is needed for the vs_nanochat harness test")
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

#[test]
fn results_from_the_committed_sample() {
    let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/testdata/vs_nanochat");
    let out = tempfile::tempdir().unwrap();
    let o = script(&["--from-raw", raw.to_str().unwrap(), "--out", out.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();

    // Throughput: median over the steps after the 3 warm-up steps, on both sides.
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(raw.join("run.json")).unwrap()).unwrap();
    let tokens = run["tokens_per_step"].as_f64().unwrap();
    let fem = jsonl(&raw.join("femtochat_metrics.jsonl"));
    let nan = jsonl(&raw.join("nanochat.jsonl"));
    let f_tps = median(fem.iter().filter_map(|m| m["tok_per_s"].as_f64()).skip(3).collect());
    let n_tps = median(
        nan.iter()
            .filter(|m| m["kind"] == "step")
            .map(|m| tokens / m["dt"].as_f64().unwrap())
            .skip(3)
            .collect(),
    );
    let close = |a: &serde_json::Value, b: f64| (a.as_f64().unwrap() - b).abs() <= 1e-9 * b.abs();
    assert!(close(&r["tok_per_s"]["femtochat"], f_tps), "{}", r["tok_per_s"]);
    assert!(close(&r["tok_per_s"]["nanochat"], n_tps), "{}", r["tok_per_s"]);
    assert!(close(&r["tok_per_s"]["ratio"], f_tps / n_tps));
    // No --peak-flops in the sample: no MFU.
    assert!(r["mfu"]["femtochat"].is_null() && r["mfu"]["ratio"].is_null());
    let f_mib = run["femtochat"]["maxrss_kib"].as_f64().unwrap() / 1024.0;
    assert!(close(&r["peak_memory_mib"]["femtochat"], f_mib));

    // Every evaluation step both sides ran, with both values.
    let evals = r["val_bpb"].as_array().unwrap();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 3, 6]);
    let f_last = fem.iter().rev().find_map(|m| m["val_bpb"].as_f64()).unwrap();
    assert!(close(&evals[2]["femtochat"], f_last));
    assert_eq!(r["steps"]["femtochat"], 6);
    assert_eq!(r["steps"]["nanochat"], 6);
    assert_eq!(r["params"]["femtochat"], r["params"]["nanochat"]);

    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(md.contains("| metric | femtochat | nanochat | femtochat / nanochat |"), "{md}");
    assert!(md.contains(&format!("| {:.2}x |", f_tps / n_tps)), "{md}");
    assert_eq!(md.lines().filter(|l| l.starts_with("| val bpb at step")).count(), 3);
    assert!(md.contains("`92d63d4`"));
}

#[test]
fn refuses_unpinned_or_missing_commits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let o = script(&["--ref", "deadbeef", "--nanochat", d, "--tokenizer", d]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a pinned commit"));
    // A repository without the pinned commit (the user has not fetched it).
    assert!(Command::new("git").args(["init", "-q", d]).status().unwrap().success());
    let o = script(&["--ref", "92d63d4", "--nanochat", d, "--tokenizer", d, "--work", d]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not there"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
