//! Run directories are never lost by an ordinary command (docs/reliability.md, "train"): a new
//! run refuses an existing one, one writer at a time, `--resume` continues the same run or says
//! why not, bad data deep in a file keeps the work done, absurd sizes are refused up front.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "stderr: {}", stderr(out));
}

fn fails(out: Output, want: &str) -> String {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains(want), "expected {want:?} in: {e}");
    e
}

/// `n` short documents, one per JSONL line; `bad_line` (1-based) is not JSON.
fn write_docs(path: &Path, n: usize, bad_line: Option<usize>) {
    let words = ["the", "king", "said", "to", "his", "fool", "and", "queen", "that", "night"];
    let mut s = String::new();
    for i in 1..=n {
        if Some(i) == bad_line {
            s.push_str("{\"text\": oops\n");
            continue;
        }
        let doc: Vec<&str> = (0..6 + i % 5).map(|k| words[(i * 7 + k * 3) % words.len()]).collect();
        s.push_str(&format!("{}\n", serde_json::json!({ "text": doc.join(" ") })));
    }
    std::fs::write(path, s).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tok: String,
    data: String,
}

fn fixture(docs: usize, bad_line: Option<usize>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("docs.jsonl");
    write_docs(&data, docs, bad_line);
    let clean = root.join("clean.jsonl");
    write_docs(&clean, 200, None);
    let tok = root.join("tok");
    ok(&train(&[
        "tokenizer",
        "--input",
        clean.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]));
    Fixture {
        _dir: dir,
        root,
        tok: tok.to_string_lossy().into(),
        data: data.to_string_lossy().into(),
    }
}

/// A tiny base run's flags: depth 1, 2 x 32 tokens per step. `extra` holds switches and
/// `--flag value` pairs; a pair replaces the default of its flag (clap refuses repeats).
fn base<'a>(f: &'a Fixture, out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "base",
        "--tokenizer",
        &f.tok,
        "--out",
        out,
        "--data",
        &f.data,
        "--val",
        &f.data,
        "--depth",
        "1",
        "--max-seq-len",
        "32",
        "--device-batch-size",
        "2",
        "--total-batch-size",
        "64",
        "--num-iterations",
        steps,
        "--eval-every",
        "0",
        "--eval-tokens",
        "64",
        "--sample-every",
        "0",
        "--save-every",
        "2",
    ];
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let value = extra.get(i + 1).filter(|x| !x.starts_with("--")).copied();
        match (value, v.iter().position(|a| *a == flag)) {
            (Some(val), Some(at)) => v[at + 1] = val,
            (Some(val), None) => v.extend_from_slice(&[flag, val]),
            (None, _) => v.push(flag),
        }
        i += if value.is_some() { 2 } else { 1 };
    }
    v
}

fn loss_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["loss"].is_number())
        .collect()
}

#[test]
fn a_new_run_never_overwrites_an_old_one() {
    let f = fixture(300, None);
    let run = f.root.join("run");
    let r = run.to_str().unwrap();
    ok(&train(&base(&f, r, "3", &[])));
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let latest = std::fs::read(run.join("latest.json")).unwrap();
    // Same command again: refused, naming both ways out; nothing changed.
    let e = fails(train(&base(&f, r, "3", &[])), "already holds a run");
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    assert_eq!(std::fs::read(run.join("latest.json")).unwrap(), latest);
    assert!(run.join("step_000003/model.safetensors").exists());
    // --overwrite moves the old run aside, whole.
    ok(&train(&base(&f, r, "2", &["--overwrite"])));
    let aside: Vec<PathBuf> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("run.old-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(aside[0].join("metrics.jsonl")).unwrap(), before);
    assert_eq!(loss_lines(&run).len(), 2);
}

#[test]
fn resume_continues_the_same_run_or_says_why_not() {
    let f = fixture(300, None);
    let run = f.root.join("run");
    let r = run.to_str().unwrap();
    ok(&train(&base(&f, r, "3", &[])));
    // Flags that define the run cannot change.
    let e = fails(
        train(&base(&f, r, "3", &["--resume", "--depth", "2", "--matrix-lr", "0.1"])),
        "contradict",
    );
    assert!(e.contains("--depth 2 (the run has 1)") && e.contains("--matrix-lr 0.1"), "{e}");
    // Other data: refused unless --force.
    let other = f.root.join("other.jsonl");
    write_docs(&other, 250, None);
    let o = other.to_str().unwrap();
    let resume_on = |data: &str, extra: &[&str]| {
        let mut args = vec!["base", "--out", r, "--resume", "--data", data, "--val", data];
        args.extend_from_slice(extra);
        train(&args)
    };
    fails(resume_on(o, &["--num-iterations", "4"]), "--force");
    // A finished run has nothing to do; --num-iterations extends it with real steps.
    let done = train(&["base", "--out", r, "--resume", "--data", &f.data, "--val", &f.data]);
    ok(&done);
    assert!(stderr(&done).contains("complete at step 3"), "{}", stderr(&done));
    let out = resume_on(&f.data, &["--num-iterations", "5"]);
    ok(&out);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["steps"], 5);
    assert!(summary["final_loss"].as_f64().is_some_and(f64::is_finite), "{summary}");
    let losses = loss_lines(&run);
    assert_eq!(losses.len(), 5);
    assert!(losses.iter().enumerate().all(|(i, l)| l["step"] == i));
    fails(resume_on(&f.data, &["--num-iterations", "4"]), "already at step 5");
}

#[test]
fn one_writer_per_run_and_temporaries_are_cleaned() {
    let f = fixture(300, None);
    let run = f.root.join("run");
    let r = run.to_str().unwrap();
    ok(&train(&base(&f, r, "2", &[])));
    // A live writer (this test process) holds the lock.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    let lock = serde_json::json!({
        "pid": std::process::id(), "host": host, "started": 1, "command": "test"
    });
    std::fs::write(run.join("run.lock"), lock.to_string()).unwrap();
    let extend = [
        "base",
        "--out",
        r,
        "--resume",
        "--data",
        &f.data,
        "--val",
        &f.data,
        "--num-iterations",
        "3",
    ];
    fails(train(&extend), "is in use");
    std::fs::remove_file(run.join("run.lock")).unwrap();
    // A crash mid-write leaves a temporary file: the next start removes it.
    let tmp = run.join("step_000002").join(".model.safetensors.tmp99999");
    std::fs::write(&tmp, "partial").unwrap();
    ok(&train(&extend));
    assert!(!tmp.exists());
    assert!(!run.join("run.lock").exists(), "the lock is released at exit");
}

#[test]
fn bad_data_deep_in_a_file_keeps_the_work_and_can_be_skipped() {
    // The loader buffers 1000 documents, so line 1040 is read a few steps in.
    let f = fixture(1100, Some(1040));
    let run = f.root.join("run");
    let r = run.to_str().unwrap();
    let args = base(&f, r, "40", &["--save-every", "0"]);
    let e = fails(train(&args), "docs.jsonl:1040");
    assert!(e.contains("saved"), "{e}");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("latest.json")).unwrap()).unwrap();
    let step = latest["step"].as_u64().unwrap();
    assert!(step > 0 && step < 40, "{latest}");
    assert_eq!(loss_lines(&run).len() as u64, step);
    // The same data with --skip-bad: the run continues past the record and counts it.
    let out =
        train(&["base", "--out", r, "--resume", "--data", &f.data, "--val", &f.data, "--skip-bad"]);
    ok(&out);
    assert!(stderr(&out).contains("skipped 1 bad records"), "{}", stderr(&out));
    assert_eq!(loss_lines(&run).len(), 40);
}

#[test]
fn absurd_sizes_and_bad_numbers_are_refused_up_front() {
    let f = fixture(300, None);
    let run = f.root.join("run");
    let r = run.to_str().unwrap();
    let e = fails(train(&base(&f, r, "2", &["--depth", "10000"])), "GiB");
    assert!(e.contains("needs about"), "{e}");
    fails(
        train(&base(&f, r, "2", &["--max-seq-len", "100000000", "--device-batch-size", "64"])),
        "needs about",
    );
    for bad in ["--matrix-lr=-1", "--matrix-lr=nan", "--embedding-lr=inf"] {
        let mut args = base(&f, r, "2", &[]);
        args.push(bad);
        let e = fails(train(&args), "invalid value");
        assert!(e.contains("finite"), "{e}");
    }
    assert!(!run.exists(), "nothing was written for refused runs");
}
