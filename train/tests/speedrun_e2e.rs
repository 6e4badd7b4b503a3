//! `./speedrun.sh tiny`: the whole pipeline (tokenizer, base, CORE, SFT, chat eval, RL, chat
//! eval, report) end to end on the bundled data; the report's numbers are the stages' own, and a
//! second run skips the complete stages and resumes an interrupted one.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn speedrun(out: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../speedrun.sh");
    let o = Command::new("bash")
        .arg(&script)
        .args(["tiny", "--out"])
        .arg(out)
        .env("TRAIN", env!("CARGO_BIN_EXE_train"))
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    text
}

#[test]
fn tiny_speedrun_runs_end_to_end_and_reports_the_stages_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("run");
    speedrun(&out);
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report/report.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    for s in ["## Tokenizer", "## BASE", "## SFT", "## RL", "## Summary"] {
        assert!(md.contains(s), "{s} missing:\n{md}");
    }
    let stages = report["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "sft", "rl"]);
    // Base: the last validation bpb and the CORE summary line.
    let base = jsonl(&out.join("base/metrics.jsonl"));
    let bpb = base.iter().rev().find_map(|v| v["val_bpb"].as_f64()).unwrap();
    assert_eq!(stages[0]["val_bpb"].as_f64(), Some(bpb));
    let core = jsonl(&out.join("base/eval/core.jsonl"));
    assert_eq!(
        stages[0]["core"],
        core.iter().rev().find(|v| v["core"].is_number()).unwrap()["core"]
    );
    assert_eq!(stages[0]["steps"], 20);
    // SFT and RL: the chat accuracies of their evaluations; RL's reward and pass@k.
    for (i, name) in [(1, "sft"), (2, "rl")] {
        let chat = jsonl(&out.join(name).join("eval/chat.jsonl"));
        for v in chat.iter().filter(|v| v["task"].is_string()) {
            let row = stages[i]["chat"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r[0] == v["task"])
                .unwrap_or_else(|| panic!("{name}: no {}", v["task"]));
            assert_eq!(row[1], v["accuracy"]);
        }
        let cc = chat.iter().find(|v| v["chatcore"].is_number()).unwrap();
        assert_eq!(stages[i]["chatcore"], cc["chatcore"]);
    }
    let rl = jsonl(&out.join("rl/metrics.jsonl"));
    let last_eval = rl.iter().rev().find(|v| v["pass@1"].is_number()).unwrap();
    assert_eq!(stages[2]["pass_at_k"][0], last_eval["pass@1"]);
    assert_eq!(stages[2]["pass_at_k"][1], last_eval["pass@2"]);
    let reward = rl.iter().rev().find_map(|v| v["reward"].as_f64()).unwrap();
    assert_eq!(stages[2]["reward"].as_f64(), Some(reward));
    // Every stage logged to its directory; the plots are there.
    for log in ["tokenizer.log", "base/base.log", "sft/sft.log", "rl/rl.log", "report/report.log"] {
        assert!(out.join(log).exists(), "{log}");
    }
    assert!(out.join("report/scores.svg").exists());
    // Again, after an interruption of RL (its newest checkpoint lost): the complete stages are
    // skipped, RL resumes from step 1 and logs what the uninterrupted run logged.
    let evals = jsonl(&out.join("rl/eval/chat.jsonl")).len();
    let before = timeless(jsonl(&out.join("rl/metrics.jsonl")));
    std::fs::write(out.join("rl/latest.json"), r#"{"step":1,"dir":"step_000001"}"#).unwrap();
    let again = speedrun(&out);
    assert_eq!(again.matches("nothing to do").count(), 2, "{again}");
    assert!(again.contains("resuming") && again.contains("at step 1"), "{again}");
    assert!(!again.contains("== eval-"), "{again}");
    assert_eq!(jsonl(&out.join("rl/eval/chat.jsonl")).len(), evals);
    assert_eq!(timeless(jsonl(&out.join("rl/metrics.jsonl"))), before);
}

/// Metrics lines without their timings.
fn timeless(lines: Vec<Value>) -> Vec<Value> {
    lines
        .into_iter()
        .map(|mut v| {
            for k in ["dt_ms", "gen_tok_per_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}
