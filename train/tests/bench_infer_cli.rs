//! `train bench-infer` end to end on a tiny random model: one JSON line per batch size with the
//! documented fields and the whole run as one document on the last line, greedy tokens that do not depend on the batch size, and bad flags
//! rejected with an error instead of a panic.
use std::process::Command;

fn bench(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--threads", "2", "bench-infer", "--depth", "2", "--aspect-ratio", "32"])
        .args(["--head-dim", "16", "--max-seq-len", "64", "--vocab-size", "300"])
        .args(["--rounds", "1", "--peak-bandwidth", "1e10"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn one_json_line_per_batch_size() {
    let out = bench(&["--batch-sizes", "1,3", "--prompt-tokens", "5", "--decode-tokens", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "two batch sizes and the summary");
    let (summary, lines) = lines.split_last().unwrap();
    assert_eq!(summary["bench"], "infer_summary");
    assert_eq!(summary["results"].as_array().unwrap(), lines, "the summary holds every line");
    assert_eq!(summary["isa"], lines[0]["isa"]);
    for (line, b) in lines.iter().zip([1, 3]) {
        assert_eq!(line["bench"], "infer");
        assert_eq!(line["batch"], b);
        assert_eq!(line["threads"], 2);
        assert_eq!(line["prompt_len"], 5);
        assert_eq!(line["gen_len"], 7);
        assert!(line["isa"].is_string());
        for k in ["tok_per_s", "ms_per_token", "prefill_tok_per_s", "ttft_ms", "mbu"] {
            assert!(line[k].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()), "{k}: {line}");
        }
        assert_eq!(line["tokens"].as_array().unwrap().len(), 7);
    }
    // Every row decodes the same prompt greedily: batch 3 generates batch 1's tokens.
    assert_eq!(lines[0]["tokens"], lines[1]["tokens"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tok/s"), "no table: {stderr}");
}

/// `--dtype bf16`: the same report with half the weight bytes in memory and per step.
#[test]
fn bf16_weights_halve_the_weight_bytes() {
    let run = |dtype: &str| -> serde_json::Value {
        let out = bench(
            &["--batch-sizes", "2", "--prompt-tokens", "4", "--decode-tokens", "3"]
                .into_iter()
                .chain(["--dtype", dtype])
                .collect::<Vec<_>>(),
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let (full, half) = (run("fp32"), run("bf16"));
    assert_eq!((full["dtype"].as_str(), half["dtype"].as_str()), (Some("fp32"), Some("bf16")));
    let ratio = |k: &str, a: &serde_json::Value, b: &serde_json::Value| {
        a[k].as_f64().unwrap() / b[k].as_f64().unwrap()
    };
    let w = ratio("weight_bytes", &full, &half);
    assert!(w > 1.9 && w < 2.0, "weight bytes fp32/bf16 = {w}");
    let (lf, lh) = (&full["results"][0], &half["results"][0]);
    assert!(ratio("bytes_per_step", lf, lh) > 1.3, "{lf} vs {lh}");
    assert!(lh["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(half["peak_host_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn bad_flags_are_errors() {
    for extra in [
        &["--batch-sizes", "0"][..],
        &["--prompt-tokens", "0"],
        &["--prompt-tokens", "600", "--decode-tokens", "100"], // past 10 x 64 positions
    ] {
        let out = bench(extra);
        assert!(!out.status.success(), "{extra:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
}
